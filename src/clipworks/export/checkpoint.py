"""Reading a CLIP checkpoint's weights with torch, for callers outside ``export/`` (which may not import torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_state_dict(checkpoint: Path) -> dict[str, Any]:
    """The state dict of an OpenAI-style checkpoint: a TorchScript archive or a pickled (state) dict.

    Raises ``ImportError`` without torch (the export extra), so the caller can say which command needs it.
    """
    import torch

    try:
        return torch.jit.load(str(checkpoint), map_location="cpu").state_dict()
    except Exception:
        loaded = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        return loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded.state_dict()
