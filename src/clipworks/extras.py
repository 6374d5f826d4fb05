"""Optional dependencies: what each feature needs, and the one-line message when it is not installed.

The runtime install (``pip install clipworks``) is ONNX Runtime, numpy, Pillow and the tokenizer; video
decoding, streams, Parquet and the web servers come with extras. A feature checks its modules with
:func:`require` before it starts work, so a missing one is one line naming the extra, not a traceback
from deep inside a run.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from clipworks.errors import ClipworksError


class MissingExtra(ClipworksError):
    """A feature whose optional dependency is not installed."""


# module -> (its pip name, shown when it is missing)
PIP_NAMES = {"av": "av", "cv2": "opencv-python", "fastapi": "fastapi", "uvicorn": "uvicorn", "pyarrow": "pyarrow",
             "trackers": "trackers", "supervision": "supervision", "faiss": "faiss-cpu",
             "sklearn": "scikit-learn", "fsspec": "fsspec"}  # fmt: skip


def require(modules: str | Iterable[str], extra: str, feature: str) -> None:
    """Import ``modules`` or raise ``MissingExtra``: "FEATURE needs X: pip install 'clipworks[EXTRA]'"."""
    for module in [modules] if isinstance(modules, str) else modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            name = PIP_NAMES.get(module, module)
            raise MissingExtra(
                f"{feature} needs {name}, which is not installed: pip install 'clipworks[{extra}]'"
            ) from e
