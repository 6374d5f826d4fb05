"""Write open_clip's CLIP tokenizer as Hugging Face ``CLIPTokenizerFast`` files, for our bundles and Immich's runtime.

Here, under ``export/``, because it reads open_clip's own vocabulary tables; the runtime's
:class:`clipworks.tokenizer.ClipTokenizer` only reads the files this writes.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from clipworks.errors import ClipworksError
from clipworks.tokenizer import EOT, OPEN_CLIP_EOT, OPEN_CLIP_SOT, SOT

# What Hugging Face's CLIP files carry (special tokens first): we write that, for Immich's runtime.
_HF_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def write_tokenizer_files(textual_dir: Path, context_length: int = 77) -> None:
    """Write open_clip's CLIP tokenizer as Hugging Face CLIPTokenizerFast files into ``textual_dir``.

    Needs open_clip (the ``export`` extra): the vocabulary is the one its wheel ships.
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise ClipworksError(
            f"writing tokenizer files needs open_clip ({e.name} is not installed): "
            "pip install 'clipworks[export]', or pull a ready bundle with `clipworks models pull`"
        ) from e
    del SimpleTokenizer  # imported above only to fail early with the install hint
    textual_dir = Path(textual_dir)
    textual_dir.mkdir(parents=True, exist_ok=True)
    (textual_dir / "tokenizer.json").write_text(_tokenizer_json_text(), encoding="utf-8")
    special = {name: _added_token(content) for name, content in (("bos", SOT), ("eos", EOT), ("unk", EOT))}
    _write_json(
        textual_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": {"__type": "AddedToken", **special["bos"]},
            "do_lower_case": True,
            "eos_token": {"__type": "AddedToken", **special["eos"]},
            "errors": "replace",
            "model_max_length": context_length,
            "pad_token": EOT,  # a plain string: Immich reads it as tokenizer_config["pad_token"]
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": {"__type": "AddedToken", **special["unk"]},
        },
    )
    special_map = {"bos_token": special["bos"], "eos_token": special["eos"], "pad_token": EOT}
    _write_json(textual_dir / "special_tokens_map.json", {**special_map, "unk_token": special["unk"]})


@cache
def _tokenizer_json_text() -> str:
    """``tokenizer.json``'s text, built once a process: the vocabulary is open_clip's, the same for every export
    (building and writing its 49,408 entries and merges cost seconds each time)."""
    from open_clip.tokenizer import SimpleTokenizer

    # open_clip's own tables, so the ids are its ids by construction; only the special names are renamed.
    simple = SimpleTokenizer()
    rename = {OPEN_CLIP_SOT: SOT, OPEN_CLIP_EOT: EOT}
    vocab = {rename.get(token, token): token_id for token, token_id in simple.encoder.items()}
    merges = [f"{a} {b}" for (a, b), _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    if vocab.get(SOT) != simple.sot_token_id or vocab.get(EOT) != simple.eot_token_id:
        raise ClipworksError(f"open_clip's tokenizer has unexpected special tokens: {simple.all_special_ids}")
    return json.dumps(_tokenizer_json(vocab, merges, vocab[SOT], vocab[EOT]), indent=2, ensure_ascii=False) + "\n"


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _tokenizer_json(vocab: dict[str, int], merges: list[str], sot: int, eot: int) -> dict[str, Any]:
    """``tokenizer.json`` as Hugging Face's CLIP files have it: Immich's runtime relies on its normaliser,
    post-processor (start and end tokens, end kept on truncation) and added tokens."""
    added = [{"id": i, **_added_token(content), "special": True} for i, content in ((sot, SOT), (eot, EOT))]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _HF_WORDS}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [EOT, eot],
            "cls": [SOT, sot],
            "trim_offsets": False,
            "add_prefix_space": False,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": EOT,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            # "a b" strings, not pairs: tokenizers < 0.20 (Immich pins older releases) reads only these.
            "merges": merges,
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
