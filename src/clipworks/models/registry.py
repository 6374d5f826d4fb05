"""Model names: canonical ``ARCH::TAG`` records, OpenAI aliases, and where each bundle comes from.

Names are data (a table of records), in the way open_clip keeps ``pretrained.py`` and timm its
``PretrainedCfg``: adding a model is one row, not a new branch. A row says only what open_clip does not:
the weights' licence and OpenAI's aliases. Dimensions, image size, text length and family come from
open_clip's own model config, shipped as ``data/open_clip_models.json`` (derived from open_clip by
``tests/open_clip_facts.py``, so the runtime never imports it). Whether a ready ONNX bundle exists is looked
up in Immich's own list of published bundles (``immich_names``); a record without one is export-only (the
export extra turns open_clip's weights into a bundle).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from clipworks import settings
from clipworks.errors import ModelNotFound
from clipworks.models.immich_names import published_repo
from clipworks.models.sources import open_clip_knows

SEPARATOR = "::"
RANDOM_TAG = "random"
OPEN_CLIP_FACTS = Path(__file__).resolve().parents[1] / "data" / "open_clip_models.json"


@cache
def _open_clip_facts() -> dict[str, Any]:
    return json.loads(OPEN_CLIP_FACTS.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ModelRecord:
    """One pretrained weight set: open_clip's architecture and tag, its licence, and what open_clip's config says."""

    arch: str
    tag: str
    # The weights' licence as their model card tags it (Hugging Face's licence identifiers).
    licence: str
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arch}{SEPARATOR}{self.tag}"

    @property
    def dirname(self) -> str:
        return f"{self.arch}__{self.tag}"

    @property
    def config(self) -> dict[str, Any]:
        """The parts of open_clip's model config the runtime reads (``data/open_clip_models.json``)."""
        return _open_clip_facts()["architectures"][self.arch]

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.config["vision_cfg"]["image_size"])

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))  # open_clip's default

    @property
    def family(self) -> str:
        """The runtime family the config is recognised as (``clipworks.models.family``)."""
        from clipworks.models.family import family_for_config

        return family_for_config(self.config).name

    @property
    def source(self) -> str:
        """Where open_clip downloads the weights: ``hf-hub:ORG/NAME`` or a URL."""
        return _open_clip_facts()["weights"][self.name]["source"]

    @property
    def hf_repo(self) -> str | None:
        """The hub repository of Immich's ready ONNX bundle; None for export-only weights."""
        return published_repo(self.arch, self.tag)


OPENAI = "mit"  # OpenAI's CLIP repository
OPEN_CLIP = "mit"  # LAION, DataComp and the YFCC/CC12M runs: open_clip's own trainings
APPLE_DFN = "apple-ascl"  # Apple sample code licence
APPLE_MOBILECLIP = "apple-amlr"  # Apple machine learning research model licence
GOOGLE_SIGLIP = "apache-2.0"
NLLB = "cc-by-nc-4.0"  # NLLB's text tower is non-commercial

# Every open_clip weight set Immich publishes a bundle of, and others worth naming (export-only): SigLIP and
# SigLIP 2 (sigmoid family), MobileCLIP (small devices), multilingual text towers (XLM-R, NLLB). Tests check
# the table against open_clip and against Immich's list.
MODELS: tuple[ModelRecord, ...] = (
    ModelRecord("ViT-B-32", "openai", OPENAI, ("ViT-B/32",)),
    ModelRecord("ViT-B-16", "openai", OPENAI, ("ViT-B/16",)),
    ModelRecord("ViT-L-14", "openai", OPENAI, ("ViT-L/14",)),
    ModelRecord("ViT-L-14-336", "openai", OPENAI, ("ViT-L/14@336px",)),
    ModelRecord("RN50", "openai", OPENAI, ("RN50",)),
    ModelRecord("RN101", "openai", OPENAI, ("RN101",)),
    ModelRecord("RN50x4", "openai", OPENAI, ("RN50x4",)),
    ModelRecord("RN50x16", "openai", OPENAI, ("RN50x16",)),
    ModelRecord("RN50x64", "openai", OPENAI, ("RN50x64",)),
    ModelRecord("RN50", "yfcc15m", OPEN_CLIP),
    ModelRecord("RN50", "cc12m", OPEN_CLIP),
    ModelRecord("RN101", "yfcc15m", OPEN_CLIP),
    ModelRecord("ViT-B-32", "laion2b_s34b_b79k", OPEN_CLIP),
    ModelRecord("ViT-B-32", "laion2b_e16", OPEN_CLIP),
    ModelRecord("ViT-B-32", "laion400m_e31", OPEN_CLIP),
    ModelRecord("ViT-B-32", "laion400m_e32", OPEN_CLIP),
    ModelRecord("ViT-B-32", "datacomp_xl_s13b_b90k", OPEN_CLIP),
    ModelRecord("ViT-B-16", "laion400m_e31", OPEN_CLIP),
    ModelRecord("ViT-B-16", "laion400m_e32", OPEN_CLIP),
    ModelRecord("ViT-B-16-plus-240", "laion400m_e31", OPEN_CLIP),
    ModelRecord("ViT-B-16-plus-240", "laion400m_e32", OPEN_CLIP),
    ModelRecord("ViT-L-14", "laion2b_s32b_b82k", OPEN_CLIP),
    ModelRecord("ViT-L-14", "laion400m_e31", OPEN_CLIP),
    ModelRecord("ViT-L-14", "laion400m_e32", OPEN_CLIP),
    ModelRecord("ViT-L-14", "datacomp_xl_s13b_b90k", OPEN_CLIP),
    ModelRecord("ViT-L-14-quickgelu", "dfn2b", APPLE_DFN),
    ModelRecord("ViT-H-14", "laion2b_s32b_b79k", OPEN_CLIP),
    ModelRecord("ViT-H-14-quickgelu", "dfn5b", APPLE_DFN),
    ModelRecord("ViT-H-14-378-quickgelu", "dfn5b", APPLE_DFN),
    ModelRecord("ViT-g-14", "laion2b_s12b_b42k", OPEN_CLIP),
    # MobileCLIP: CLIP BPE text, timm image towers (FastViT / MCi) for phones and small boards.
    ModelRecord("MobileCLIP-S1", "datacompdr", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP-S2", "datacompdr", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP-B", "datacompdr", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP-B", "datacompdr_lt", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-S0", "dfndr2b", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-S2", "dfndr2b", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-S3", "dfndr2b", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-S4", "dfndr2b", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-B", "dfndr2b", APPLE_MOBILECLIP),
    ModelRecord("MobileCLIP2-L-14", "dfndr2b", APPLE_MOBILECLIP),
    # SigLIP: SentencePiece text (i18n: multilingual), a sigmoid per label.
    ModelRecord("ViT-B-16-SigLIP", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP-512", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP-i18n-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-L-16-SigLIP-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-L-16-SigLIP-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-14-SigLIP", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-14-SigLIP-378", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-14-SigLIP-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-16-SigLIP-i18n-256", "webli", GOOGLE_SIGLIP),
    # SigLIP 2: Gemma's multilingual tokenizer.
    ModelRecord("ViT-B-32-SigLIP2-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP2", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP2-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP2-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-B-16-SigLIP2-512", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-L-16-SigLIP2-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-L-16-SigLIP2-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-L-16-SigLIP2-512", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-14-SigLIP2", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-14-SigLIP2-378", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-16-SigLIP2-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-16-SigLIP2-384", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-SO400M-16-SigLIP2-512", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-gopt-16-SigLIP2-256", "webli", GOOGLE_SIGLIP),
    ModelRecord("ViT-gopt-16-SigLIP2-384", "webli", GOOGLE_SIGLIP),
    # Multilingual text towers: XLM-RoBERTa (softmax) and NLLB (NLLB-SigLIP: sigmoid).
    ModelRecord("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", OPEN_CLIP),
    ModelRecord("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k", OPEN_CLIP),
    ModelRecord("nllb-clip-base", "v1", NLLB),
    ModelRecord("nllb-clip-large", "v1", NLLB),
    ModelRecord("nllb-clip-base-siglip", "v1", NLLB),
    ModelRecord("nllb-clip-base-siglip", "mrl", NLLB),
    ModelRecord("nllb-clip-large-siglip", "v1", NLLB),
    ModelRecord("nllb-clip-large-siglip", "mrl", NLLB),
)

_BY_NAME = {m.name.lower(): m for m in MODELS}
_ALIASES = {a.lower(): m for m in MODELS for a in m.aliases}


@dataclass(frozen=True)
class ModelRef:
    """A parsed model name: a known record, or an architecture and tag only open_clip may know."""

    arch: str
    tag: str
    record: ModelRecord | None = None

    @property
    def name(self) -> str:
        return f"{self.arch}{SEPARATOR}{self.tag}"

    @property
    def dirname(self) -> str:
        return f"{self.arch}__{self.tag}"

    @property
    def hf_repo(self) -> str | None:
        return self.record.hf_repo if self.record else None

    def cache_path(self) -> Path:
        return settings.models_dir() / self.dirname


def list_models() -> list[ModelRecord]:
    return list(MODELS)


def parse_model_name(name: str) -> ModelRef:
    """Turn ``ViT-B/32``, ``ViT-B-32::openai`` or ``ViT-B-32::random`` into a ``ModelRef``.

    Unknown names raise ``ModelNotFound`` with the close matches, never a silent guess.
    """
    key = name.strip()
    lowered = key.lower()
    if lowered in _ALIASES:
        record = _ALIASES[lowered]
        return ModelRef(record.arch, record.tag, record)
    if lowered in _BY_NAME:
        record = _BY_NAME[lowered]
        return ModelRef(record.arch, record.tag, record)
    if SEPARATOR in key:
        arch, _, tag = key.partition(SEPARATOR)
        if arch and tag and _arch_exists(arch):
            return ModelRef(_canonical_arch(arch), tag)
    choices = [m.name for m in MODELS] + [a for m in MODELS for a in m.aliases]
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFound(
        f"unknown model {name!r}.{hint} Run `clipworks models list` for the names, "
        "or pass the path of a model bundle folder."
    )


def _canonical_arch(arch: str) -> str:
    for m in MODELS:
        if m.arch.lower() == arch.lower():
            return m.arch
    return arch


def _arch_exists(arch: str) -> bool:
    """An architecture is real if our table or open_clip's configs name it (open_clip only when installed)."""
    if any(m.arch.lower() == arch.lower() for m in MODELS):
        return True
    return open_clip_knows(arch)
