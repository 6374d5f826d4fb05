"""Resolve a model name or path to a bundle on disk, pulling it into the cache when asked."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from clipworks import settings
from clipworks.errors import BadBundle, ClipworksError, ModelNotFound, status
from clipworks.models.bundle import Bundle, is_bundle_dir, load_bundle
from clipworks.models.hub import cached_snapshot, download_snapshot, repo_cache_dir
from clipworks.models.registry import RANDOM_TAG, SEPARATOR, ModelRef, parse_model_name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", "/")) or name.endswith(".onnx") or "\\" in name


def find_local(ref: ModelRef, source: str = "auto") -> Path | None:
    """The bundle of ``ref`` in the clipworks cache (exports), else its hub snapshot in the Hugging Face cache;
    None if neither has it. ``source`` "export" or "hub" looks in that one place only. ``BadBundle`` if the hub
    snapshot there is partial."""
    cached = ref.cache_path()
    if source != "hub" and is_bundle_dir(cached):
        return cached
    if source != "export" and ref.hf_repo:
        return cached_snapshot(ref.hf_repo)
    return None


def _not_downloaded(ref: ModelRef) -> ModelNotFound:
    """The one message for a model that is not on disk while the network may not be used."""
    places = [ref.cache_path()] + ([repo_cache_dir(ref.hf_repo)] if ref.hf_repo else [])
    return ModelNotFound(
        f"{ref.name} is not downloaded (looked in {' and '.join(map(str, places))}); "
        f"run `clipworks models pull {ref.name}` with network access, pass --model PATH to a bundle folder, or, "
        f"to try things offline, use {ref.arch}{SEPARATOR}{RANDOM_TAG} (seeded random weights exported locally: "
        "needs no download, needs clipworks[export], gives meaningless vectors)"
    )


def ensure_bundle(name_or_path: str | Path | None = None, *, download: bool = True) -> Bundle:
    """A bundle folder as given, else the cached bundle of a registry name, else a fresh pull."""
    name = str(name_or_path or settings.default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        return load_bundle(path)
    try:
        ref = parse_model_name(name)
    except ModelNotFound:
        if _looks_like_path(name) or path.suffix:
            raise ModelNotFound(
                f"model path {path} does not exist; pass a bundle folder (made by `clipworks export`) or a model name"
            ) from None
        raise
    offline = not download or settings.offline()
    try:
        local = find_local(ref)
    except BadBundle:
        if offline:
            raise
        local = None  # a partial hub snapshot: pull() completes it
    if local is not None:
        return load_bundle(local)
    if offline:
        raise _not_downloaded(ref)
    return load_bundle(pull(ref))


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def pull(
    ref: ModelRef | str,
    *,
    source: str = "auto",
    precisions: tuple[str, ...] = ("fp32", "int8"),
    force: bool = False,
    log: Callable[[str], None] = status,
) -> Path:
    """Fetch ``ref``: export open_clip's weights when torch is here (into the clipworks cache), else download
    Immich's bundle (into the Hugging Face cache). Returns the bundle folder."""
    if isinstance(ref, str):
        ref = parse_model_name(ref)
    if source not in {"auto", "hub", "export"}:
        raise ClipworksError(f"unknown pull source {source!r}: use auto, hub or export")
    if not force:
        try:
            local = find_local(ref, source)
        except BadBundle:
            local = None  # a partial hub snapshot: finish that download rather than export a second copy
            source = "hub" if source == "auto" else source
        if local is not None:
            log(f"{ref.name} is already in {local}")
            return local
    if source == "auto":
        source = "export" if torch_available() or ref.tag == RANDOM_TAG else "hub"
    if source == "export":
        from clipworks.export import export_model

        dest = ref.cache_path()
        dest.parent.mkdir(parents=True, exist_ok=True)
        export_model(ref.arch, dest, pretrained=ref.tag, precisions=precisions, log=log)
        return dest
    if not ref.hf_repo:
        raise ModelNotFound(
            f"{ref.name} is export-only: Immich publishes no ready ONNX bundle of it; install the export extra "
            f"(pip install 'clipworks[export]') and run `clipworks models pull {ref.name}` to export it"
        )
    if settings.offline():
        raise _not_downloaded(ref)
    log(f"downloading {ref.hf_repo} from {settings.hf_endpoint()} into {settings.hf_hub_cache()}")
    return download_snapshot(ref.hf_repo, force=force)
