"""Resolve a model name or path to a bundle on disk, pulling it into the cache when asked.

A name is a bundle folder, ``PREFIX:TARGET`` for one source (``hf-hub:org/repo``, ``local-dir:/path``, see
``clipworks.models.sources``), or a registry name, which comes from the hub or from an export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipworks import settings
from clipworks.errors import BadBundle, ModelNotFound, UsageError, status
from clipworks.models.bundle import DEFAULT_PRECISIONS, Bundle, is_bundle_dir, load_bundle
from clipworks.models.hub import cached_snapshot, repo_cache_dir
from clipworks.models.registry import RANDOM_TAG, SEPARATOR, ModelRef, parse_model_name
from clipworks.models.sources import BundleSource, export_available, get_source, split_prefix


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
        f"run `clipworks models pull {ref.name}` with network access, give the path of a bundle folder as the "
        f"model, or, to try things offline, use {ref.arch}{SEPARATOR}{RANDOM_TAG} (seeded random weights exported "
        "locally: needs no download, needs clipworks[export], gives meaningless vectors)",
        setting="model",
    )


def can_fetch(name: str) -> bool:
    """Whether a pull could bring ``name`` (a registry name, ``hf-hub:...``), as opposed to a path or a name
    that does not exist: what a server checks before it starts without the model."""
    source, _ = split_prefix(name)
    if source is not None:
        return source.fetches
    try:
        parse_model_name(name)
    except ModelNotFound:
        return False
    return True


def _from_source(
    source: BundleSource,
    target: str,
    *,
    offline: bool,
    force: bool = False,
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
    log: Callable[[str], None] = status,
) -> Path:
    """``target`` of one named source: on disk already (unless ``force``), else fetched unless downloads are off."""
    if not force:
        try:
            local = source.find(target)
        except BadBundle:
            if offline:
                raise
            local = None  # a partial hub snapshot: fetching completes it
        if local is not None:
            return local
    if offline:
        raise ModelNotFound(
            f"{source.prefix}:{target} is not on this machine and downloads are off; fetch it with network access "
            "or give the path of a bundle folder as the model",
            setting="model",
        )
    return source.fetch(target, force=force, precisions=precisions, log=log)


def ensure_bundle(name_or_path: str | Path | None = None, *, download: bool = True) -> Bundle:
    """A bundle folder as given, else the cached bundle of a registry name, else a fresh pull."""
    name = str(name_or_path or settings.default_model())
    offline = not download or settings.offline()
    source, target = split_prefix(name)
    if source is not None:
        return load_bundle(_from_source(source, target, offline=offline))
    path = Path(name).expanduser()
    if path.is_dir():
        return load_bundle(path)
    try:
        ref = parse_model_name(name)
    except ModelNotFound:
        if _looks_like_path(name) or path.suffix:
            raise ModelNotFound(
                f"model path {path} does not exist; pass a bundle folder (made by `clipworks export`) or a model name",
                setting="model",
            ) from None
        raise
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


def pull(
    ref: ModelRef | str,
    *,
    source: str = "auto",
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
    force: bool = False,
    log: Callable[[str], None] = status,
) -> Path:
    """Fetch ``ref``: export open_clip's weights when torch is here (into the clipworks cache), else download
    Immich's bundle (into the Hugging Face cache). ``hf-hub:ORG/REPO`` downloads that repository. Returns the
    bundle folder."""
    if source not in {"auto", "hub", "export"}:
        raise UsageError(f"unknown pull source {source!r}: use auto, hub or export", setting="source")
    if isinstance(ref, str):
        named, target = split_prefix(ref)
        if named is not None:
            return _from_source(named, target, offline=settings.offline(), force=force, precisions=precisions, log=log)
        ref = parse_model_name(ref)
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
        source = "export" if export_available() or ref.tag == RANDOM_TAG else "hub"
    if source == "export":
        return get_source("export").fetch(ref.name, precisions=precisions, log=log)
    if not ref.hf_repo:
        raise ModelNotFound(
            f"{ref.name} is export-only: Immich publishes no ready ONNX bundle of it; install the export extra "
            f"(pip install 'clipworks[export]') and run `clipworks models pull {ref.name}` to export it"
        )
    if settings.offline():
        raise _not_downloaded(ref)
    return get_source("hub").fetch(ref.hf_repo, force=force, log=log)
