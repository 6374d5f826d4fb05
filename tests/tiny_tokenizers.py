"""Tiny Hugging Face tokenizers of the kinds SigLIP and SigLIP 2 use, trained here (no vocabulary can be downloaded).

Each is a folder with ``tokenizer.json`` and ``tokenizer_config.json``, the files ``transformers``' AutoTokenizer
(and so open_clip's ``HFTokenizer``) loads from a path, as it loads ``timm/ViT-B-16-SigLIP`` from the hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Words of the export check prompts and of the labels the tests use, so most prompts are whole-word tokens.
TEXT = (
    "a photo of the dog cat fruit street with buildings and cars at night seen from above old man wearing red "
    "hat scarf close up colourful butterfly on flower baboon person monkey squirrel football building walking "
    "empty road woman is lifting smiles city table"
)
_WORDS = TEXT.split()
CORPUS = [" ".join(_WORDS[i : i + 6]) for i in range(len(_WORDS))] * 4


def sentencepiece_unigram(folder: Path) -> Path:
    """SigLIP's kind (T5's SentencePiece): Unigram over Metaspace pieces, ``</s>`` appended, ``<pad>`` is 0."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.train_from_iterator(
        CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    config = {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "extra_ids": 0}  # fmt: skip
    return _save(folder, tokenizer, config)


def gemma_bpe(folder: Path) -> Path:
    """SigLIP 2's kind (Gemma's): byte-fallback BPE on "▁"-joined text, ``<bos>`` and ``<eos>`` added.

    Its config names no padding side, so ``transformers`` pads on the left, Gemma's class default.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer.train_from_iterator(
        [line.replace(" ", "▁") for line in CORPUS],
        trainers.BpeTrainer(vocab_size=400, special_tokens=specials + byte_tokens, show_progress=False),
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    config = {"tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
              "unk_token": "<unk>", "mask_token": "<mask>"}  # fmt: skip
    return _save(folder, tokenizer, config)


def bert_wordpiece(folder: Path) -> Path:
    """A BERT-style WordPiece tokenizer (CLIPA's text towers): ``[CLS] ... [SEP]``, for ``strip_sep_token``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    config = {"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]",
              "unk_token": "[UNK]", "mask_token": "[MASK]", "do_lower_case": True}  # fmt: skip
    return _save(folder, tokenizer, config)


KINDS: dict[str, Callable[[Path], Path]] = {
    "sentencepiece": sentencepiece_unigram,
    "gemma": gemma_bpe,
    "bert": bert_wordpiece,
}


def _save(folder: Path, tokenizer: Tokenizer, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
