"""Model names: canonical ``ARCH::TAG`` records, OpenAI aliases, and where each bundle comes from.

Names are data (a table of records), in the way open_clip keeps ``pretrained.py`` and timm its
``PretrainedCfg``: adding a model is one row, not a new branch. Whether a ready ONNX bundle exists is
not written here but looked up in Immich's own list of published bundles (``immich_names``); a record
without one is export-only (the export extra turns open_clip's weights into a bundle).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from clipworks import settings
from clipworks.errors import ModelNotFound
from clipworks.models.immich_names import published_repo
from clipworks.models.sources import open_clip_knows

SEPARATOR = "::"
RANDOM_TAG = "random"


@dataclass(frozen=True)
class ModelRecord:
    """One pretrained weight set: open_clip's architecture and tag, and what the runtime needs to know of it."""

    arch: str
    tag: str
    embed_dim: int
    image_size: int
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arch}{SEPARATOR}{self.tag}"

    @property
    def dirname(self) -> str:
        return f"{self.arch}__{self.tag}"

    @property
    def hf_repo(self) -> str | None:
        """The hub repository of Immich's ready ONNX bundle; None for export-only weights."""
        return published_repo(self.arch, self.tag)


# Every weight set Immich publishes a bundle of whose text tower uses CLIP's BPE tokenizer (the one the
# runtime reads), and open_clip weights without an Immich bundle that are worth naming (export-only).
# ViT-B-16-SigLIP::webli is the exception: its text tower's SentencePiece tokenizer is not one the runtime
# reads, so only its image tower runs. embed_dim and image_size are open_clip's model config values; tests
# check the table against open_clip and against Immich's list.
MODELS: tuple[ModelRecord, ...] = (
    ModelRecord("ViT-B-32", "openai", 512, 224, ("ViT-B/32",)),
    ModelRecord("ViT-B-16", "openai", 512, 224, ("ViT-B/16",)),
    ModelRecord("ViT-L-14", "openai", 768, 224, ("ViT-L/14",)),
    ModelRecord("ViT-L-14-336", "openai", 768, 336, ("ViT-L/14@336px",)),
    ModelRecord("RN50", "openai", 1024, 224, ("RN50",)),
    ModelRecord("RN101", "openai", 512, 224, ("RN101",)),
    ModelRecord("RN50x4", "openai", 640, 288, ("RN50x4",)),
    ModelRecord("RN50x16", "openai", 768, 384, ("RN50x16",)),
    ModelRecord("RN50x64", "openai", 1024, 448, ("RN50x64",)),
    ModelRecord("RN50", "yfcc15m", 1024, 224),
    ModelRecord("RN50", "cc12m", 1024, 224),
    ModelRecord("RN101", "yfcc15m", 512, 224),
    ModelRecord("ViT-B-32", "laion2b_s34b_b79k", 512, 224),
    ModelRecord("ViT-B-32", "laion2b_e16", 512, 224),
    ModelRecord("ViT-B-32", "laion400m_e31", 512, 224),
    ModelRecord("ViT-B-32", "laion400m_e32", 512, 224),
    ModelRecord("ViT-B-32", "datacomp_xl_s13b_b90k", 512, 224),
    ModelRecord("ViT-B-16", "laion400m_e31", 512, 224),
    ModelRecord("ViT-B-16", "laion400m_e32", 512, 224),
    ModelRecord("ViT-B-16-plus-240", "laion400m_e31", 640, 240),
    ModelRecord("ViT-B-16-plus-240", "laion400m_e32", 640, 240),
    ModelRecord("ViT-L-14", "laion2b_s32b_b82k", 768, 224),
    ModelRecord("ViT-L-14", "laion400m_e31", 768, 224),
    ModelRecord("ViT-L-14", "laion400m_e32", 768, 224),
    ModelRecord("ViT-L-14", "datacomp_xl_s13b_b90k", 768, 224),
    ModelRecord("ViT-L-14-quickgelu", "dfn2b", 768, 224),
    ModelRecord("ViT-H-14", "laion2b_s32b_b79k", 1024, 224),
    ModelRecord("ViT-H-14-quickgelu", "dfn5b", 1024, 224),
    ModelRecord("ViT-H-14-378-quickgelu", "dfn5b", 1024, 378),
    ModelRecord("ViT-g-14", "laion2b_s12b_b42k", 1024, 224),
    ModelRecord("ViT-B-16-SigLIP", "webli", 768, 224),
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
