"""Where bundles come from: a registry of sources, one class each.

``hub`` (Immich-layout bundles on a Hugging Face hub), ``local-dir`` (a folder already on disk) and ``export``
(open_clip's weights exported here, which needs the export extra). A model name may say which source to use
with a prefix, as open_clip's names do: ``hf-hub:immich-app/ViT-B-32__openai``, ``local-dir:/models/mine``.

``models`` never imports ``export`` (CI checks it: the runtime must stay light): the export source is named
here by its module path and imported only when a bundle is exported, so only an export pulls torch in.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

from clipworks import settings
from clipworks.errors import ModelNotFound, UsageError, status
from clipworks.models.hub import cached_snapshot, download_snapshot


class BundleSource(Protocol):
    """A place bundles come from; ``target`` is what follows the prefix (a hub repository, a folder path) or,
    for the export source, a registry name."""

    name: ClassVar[str]
    prefix: ClassVar[str | None]  # "hf-hub" accepts "hf-hub:TARGET" wherever a model name goes; None: no prefix
    fetches: ClassVar[bool]  # whether fetch can bring a target that is not here (a download, an export)

    def find(self, target: str) -> Path | None:
        """The bundle folder of ``target`` already on this machine, else None."""
        ...

    def fetch(
        self, target: str, *, force: bool = False, precisions: tuple[str, ...] = (), log: Callable[[str], None] = status
    ) -> Path:
        """Bring ``target`` onto this machine; its bundle folder."""
        ...


_SOURCES: dict[str, BundleSource] = {}
# Sources whose module needs an optional extra: imported on first use only, never at import time.
_LAZY = {"export": "clipworks.export.bundle_source:ExportSource"}


def register_source(cls: type[BundleSource]) -> type[BundleSource]:
    _SOURCES[cls.name] = cls()
    return cls


def get_source(name: str) -> BundleSource:
    """The source called ``name`` (hub, local-dir, export)."""
    if name not in _SOURCES and name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        register_source(getattr(importlib.import_module(module), attr))
    try:
        return _SOURCES[name]
    except KeyError:
        known = ", ".join(sorted({*_SOURCES, *_LAZY}))
        raise UsageError(f"unknown bundle source {name!r}: use one of {known}", setting="source") from None


def split_prefix(name: str) -> tuple[BundleSource | None, str]:
    """``("hf-hub:org/repo")`` -> (the hub source, "org/repo"); a name without a known prefix -> (None, name).

    Windows drive letters ("C:\\models") are not prefixes: a prefix is at least two letters.
    """
    prefix, sep, target = name.partition(":")
    if not sep or len(prefix) < 2 or target.startswith(":"):  # "ViT-B-32::openai" is a registry name
        return None, name
    for source in _SOURCES.values():
        if source.prefix == prefix:
            if not target:
                raise ModelNotFound(f"model {name!r} names no {prefix} target: write {prefix}:TARGET", setting="model")
            return source, target
    return None, name


def export_available() -> bool:
    """torch and open_clip are importable (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def open_clip_knows(arch: str) -> bool:
    """Whether open_clip has an architecture called ``arch``; False without the export extra."""
    if not export_available():
        return False
    return bool(get_source("export").knows_architecture(arch))  # type: ignore[attr-defined]


@register_source
class HubSource:
    """Immich-layout bundles in a Hugging Face hub repository, kept in the huggingface_hub cache."""

    name = "hub"
    prefix = "hf-hub"
    fetches = True

    def find(self, target: str) -> Path | None:
        return cached_snapshot(target)

    def fetch(
        self, target: str, *, force: bool = False, precisions: tuple[str, ...] = (), log: Callable[[str], None] = status
    ) -> Path:
        log(f"downloading {target} from {settings.hf_endpoint()} into {settings.hf_hub_cache()}")
        return download_snapshot(target, force=force)


@register_source
class LocalDirSource:
    """A bundle folder on disk (ours or Immich's layout); nothing to fetch."""

    name = "local-dir"
    prefix = "local-dir"
    fetches = False

    def find(self, target: str) -> Path | None:
        """The folder; ``ModelNotFound`` when there is none, since nothing can fetch it."""
        path = Path(target).expanduser()
        if path.is_dir():
            return path
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ModelNotFound(
            f"model folder {path} {what}; pass a bundle folder made by `clipworks export` or a model name",
            setting="model",
        )

    def fetch(
        self, target: str, *, force: bool = False, precisions: tuple[str, ...] = (), log: Callable[[str], None] = status
    ) -> Path:
        return self.find(target)  # type: ignore[return-value]  # find raises rather than return None
