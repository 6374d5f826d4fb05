"""Model names: canonical ``ARCH::TAG`` records, OpenAI aliases, and where each bundle comes from.

Names are data (a table of records), in the way open_clip keeps ``pretrained.py`` and timm its
``PretrainedCfg``: adding a model is one row, not a new branch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from clipworks import settings
from clipworks.errors import ModelNotFound

SEPARATOR = "::"
RANDOM_TAG = "random"


@dataclass(frozen=True)
class ModelRecord:
    arch: str
    tag: str
    embed_dim: int
    image_size: int
    # The Hugging Face repository holding a ready Immich-layout ONNX bundle, if one is published.
    hf_repo: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arch}{SEPARATOR}{self.tag}"

    @property
    def dirname(self) -> str:
        return f"{self.arch}__{self.tag}"


def _openai(arch: str, dim: int, size: int, alias: str) -> ModelRecord:
    return ModelRecord(arch, "openai", dim, size, f"immich-app/{arch}__openai", (alias,))


def _laion(arch: str, tag: str, dim: int, size: int) -> ModelRecord:
    return ModelRecord(arch, tag, dim, size, f"immich-app/{arch}__{tag}")


MODELS: tuple[ModelRecord, ...] = (
    _openai("ViT-B-32", 512, 224, "ViT-B/32"),
    _openai("ViT-B-16", 512, 224, "ViT-B/16"),
    _openai("ViT-L-14", 768, 224, "ViT-L/14"),
    _openai("ViT-L-14-336", 768, 336, "ViT-L/14@336px"),
    _openai("RN50", 1024, 224, "RN50"),
    _openai("RN101", 512, 224, "RN101"),
    _openai("RN50x4", 640, 288, "RN50x4"),
    _openai("RN50x16", 768, 384, "RN50x16"),
    _openai("RN50x64", 1024, 448, "RN50x64"),
    _laion("ViT-B-32", "laion2b_s34b_b79k", 512, 224),
    _laion("ViT-B-32", "laion2b_e16", 512, 224),
    _laion("ViT-B-16", "laion400m_e32", 512, 224),
    _laion("ViT-L-14", "laion2b_s32b_b82k", 768, 224),
    _laion("ViT-H-14", "laion2b_s32b_b79k", 1024, 224),
    _laion("ViT-B-16-SigLIP", "webli", 768, 224),
    _laion("ViT-B-32", "datacomp_xl_s13b_b90k", 512, 224),
    _laion("ViT-L-14", "datacomp_xl_s13b_b90k", 768, 224),
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
    try:
        import open_clip  # the export extra; absent on runtime-only installs
    except ImportError:
        return False
    return arch in open_clip.list_models()
