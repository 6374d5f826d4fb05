"""Tiny towers of real architectures for tests, built offline: multilingual text towers and MobileCLIP's image tower.

open_clip builds its multilingual models from a Hugging Face model name (``hf_model_name``) and tokenizer name
(``hf_tokenizer_name``); both accept a local folder, so a test writes a few-kilobyte XLM-RoBERTa or NLLB config
with a tokenizer trained on a handful of sentences, and points an open_clip model config at that folder.

MobileCLIP's image towers are timm's FastViT-MCi, which open_clip creates by timm name only; the smallest,
``fastvit_mci0``, takes a minute to export on a busy CPU, so ``fastvit_mci_tiny`` registers the same blocks
(RepMixer stages, an attention stage with conditional positional encoding, SE downsampling, large-kernel
activations) one layer a stage and a few channels wide.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

# Enough text in the scripts the tests use (Latin with umlauts, Chinese, emoji) that each has pieces of its own.
CORPUS = [
    "a photo of a dog", "a photo of a cat", "a red car on the street", "fruit on a table", "an old man with a hat",
    "ein Foto von einem Hund", "eine Katze schläft auf dem Sofa", "Straße mit Häusern und Autos bei Nacht",
    "Grüße aus München", "一张狗的照片", "一只猫在沙发上睡觉", "夜晚的街道和汽车", "水果",
    "🐶 dog 🐱 cat 🚗 car 🎩 hat",
    "une photo d'un chien", "una foto de un perro", "фотография собаки",
]  # fmt: skip
# NLLB prefixes every prompt with a FLORES-200 language code; a few are enough to switch between.
LANGUAGES = ["eng_Latn", "deu_Latn", "zho_Hans", "fra_Latn"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def build_xlm_roberta(folder: Path) -> Path:
    """A 2-layer, 32-wide XLM-RoBERTa with a Unigram (SentencePiece-style) tokenizer, saved as ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaConfig, XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>", shrinking_factor=0.9)
    spm = Tokenizer(models.Unigram())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(CORPUS, trainer)
    vocab = [*json.loads(spm.to_str())["model"]["vocab"], ["<mask>", 0.0]]
    tokenizer = XLMRobertaTokenizer(vocab=[tuple(v) for v in vocab], model_max_length=512)
    tokenizer.save_pretrained(folder)
    config = XLMRobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    config.save_pretrained(folder)
    return folder


def build_nllb(folder: Path) -> Path:
    """A 2-layer, 32-wide NLLB (M2M-100) encoder-decoder with a BPE tokenizer and a few language codes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, NllbTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = NllbTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], extra_special_tokens=LANGUAGES,
        src_lang="eng_Latn", model_max_length=512,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    config = M2M100Config(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    config.save_pretrained(folder)
    return folder


def point_at(template: Path, hf_folder: Path, out: Path) -> Path:
    """The open_clip config ``template`` with its text tower and tokenizer read from ``hf_folder``, saved as ``out``
    (whose stem becomes the architecture name)."""
    config = json.loads(template.read_text(encoding="utf-8"))
    config["text_cfg"].update(hf_model_name=str(hf_folder), hf_tokenizer_name=str(hf_folder))
    _write_json(out, config)
    return out


TINY_FASTVIT = "fastvit_mci_tiny"


def register_tiny_fastvit() -> str:
    """Make ``fastvit_mci_tiny`` a timm model (once): ``fastvit_mci0``'s blocks, one layer a stage, 8-64 wide."""
    import timm
    from timm.models import register_model
    from timm.models.fastvit import FastVit, RepConditionalPosEnc

    if timm.is_model(TINY_FASTVIT):
        return TINY_FASTVIT

    def fastvit_mci_tiny(pretrained: bool = False, **kwargs: Any) -> FastVit:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory passes these
            kwargs.pop(key, None)
        args: dict[str, Any] = {
            "layers": (1, 1, 1, 1),
            "embed_dims": (8, 16, 32, 64),
            "mlp_ratios": (2, 2, 2, 2),
            "se_downsamples": (False, False, True, True),
            "pos_embs": (None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
            "token_mixers": ("repmixer", "repmixer", "repmixer", "attention"),
            "lkc_use_act": True,
        }
        return FastVit(**{**args, **kwargs})

    register_model(fastvit_mci_tiny)
    return TINY_FASTVIT
