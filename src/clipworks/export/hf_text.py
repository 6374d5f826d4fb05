"""Tokenizer files of Hugging Face text towers (SigLIP, multilingual), written for ``clipworks.file_tokenizer``.

open_clip's ``HFTokenizer`` wraps a ``transformers`` fast tokenizer, whose ``save_pretrained`` writes the
``tokenizer.json`` it actually runs (transformers may rebuild the post-processor from its config when it loads
one). What ``transformers`` keeps as class defaults rather than in the files is spelled out here, because
nothing else reads the class: the pad token as a plain string (Immich reads ``tokenizer_config["pad_token"]``)
and the padding and truncation sides (Gemma's tokenizer, SigLIP 2's, pads on the left by default).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from clipworks.errors import ClipworksError
from clipworks.file_tokenizer import CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE
from clipworks.models.bundle import write_json


def is_hf_tokenizer(tokenizer: Any) -> bool:
    """Whether open_clip's tokenizer is its ``HFTokenizer`` (a ``transformers`` tokenizer inside)."""
    return callable(getattr(getattr(tokenizer, "tokenizer", None), "save_pretrained", None))


def write_hf_tokenizer_files(tokenizer: Any, textual_dir: Path, context_length: int) -> None:
    """Write the ``tokenizer.json``, ``tokenizer_config.json`` (and ``special_tokens_map.json`` where
    ``transformers`` writes one) of open_clip's ``HFTokenizer`` into ``textual_dir``."""
    hf = tokenizer.tokenizer
    if not getattr(hf, "is_fast", False):
        raise ClipworksError(
            f"the Hugging Face tokenizer {type(hf).__name__} has no tokenizer.json (not a fast tokenizer), "
            "which the runtime reads; this model cannot be exported yet - please report it"
        )
    if hf.pad_token is None:
        raise ClipworksError(f"the Hugging Face tokenizer {hf.name_or_path!r} has no pad token; it cannot pad rows")
    textual_dir = Path(textual_dir)
    textual_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)  # may also write vocabularies for slow tokenizers, which the runtime never reads
        for name in (TOKENIZER_FILE, SPECIAL_TOKENS_FILE):
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, textual_dir / name)
        config_path = Path(tmp) / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.update(
        pad_token=str(hf.pad_token),
        padding_side=hf.padding_side,
        truncation_side=hf.truncation_side,
        model_max_length=context_length,
    )
    write_json(textual_dir / CONFIG_FILE, config)
