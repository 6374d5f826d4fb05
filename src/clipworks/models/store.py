"""Resolve a model name or path to a bundle on disk, pulling it into the cache when asked."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from clipworks import settings
from clipworks.errors import ClipworksError, ModelNotFound, status
from clipworks.models.bundle import Bundle, is_bundle_dir, load_bundle
from clipworks.models.hub import download_bundle, find_in_hf_cache
from clipworks.models.registry import RANDOM_TAG, SEPARATOR, ModelRef, parse_model_name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", "/")) or name.endswith(".onnx") or "\\" in name


def find_local(ref: ModelRef) -> Path | None:
    """The bundle of ``ref`` in the clipworks cache, else in the Hugging Face cache; None if absent."""
    cached = ref.cache_path()
    if is_bundle_dir(cached):
        return cached
    if ref.hf_repo:
        return find_in_hf_cache(ref.hf_repo)
    return None


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
    local = find_local(ref)
    if local is not None:
        return load_bundle(local)
    if not download or settings.offline():
        raise ModelNotFound(
            f"{ref.name} is not downloaded (looked in {ref.cache_path()}); run `clipworks models pull {ref.name}` "
            f"with network access, pass --model PATH to a bundle folder, or, to try things offline, use "
            f"{ref.arch}{SEPARATOR}{RANDOM_TAG} (seeded random weights exported locally: needs no download, "
            "needs clipworks[export], gives meaningless vectors)"
        )
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
    """Fetch ``ref`` into the cache: export from open_clip when torch is here, else the Immich hub bundle."""
    if isinstance(ref, str):
        ref = parse_model_name(ref)
    dest = ref.cache_path()
    if is_bundle_dir(dest) and not force:
        log(f"{ref.name} is already in {dest}")
        return dest
    if source == "auto":
        source = "export" if torch_available() or ref.tag == RANDOM_TAG else "hub"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source == "export":
        from clipworks.export import export_model

        export_model(ref.arch, dest, pretrained=ref.tag, precisions=precisions, log=log)
        return dest
    if source != "hub":
        raise ClipworksError(f"unknown pull source {source!r}: use auto, hub or export")
    if not ref.hf_repo:
        raise ModelNotFound(
            f"no ready ONNX bundle is published for {ref.name}; install the export extra "
            f"(pip install 'clipworks[export]') and run `clipworks models pull {ref.name}` to export it"
        )
    log(f"downloading {ref.hf_repo} from {settings.hf_endpoint()}")
    download_bundle(ref.hf_repo, dest)
    return dest
