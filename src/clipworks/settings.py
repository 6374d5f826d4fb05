"""Paths and defaults. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32::openai"
HF_ENDPOINT_DEFAULT = "https://huggingface.co"


def cache_dir() -> Path:
    """Where pulled and exported model bundles live (``CLIPWORKS_HOME``, else ``~/.cache/clipworks``)."""
    env = os.environ.get("CLIPWORKS_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clipworks"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_model() -> str:
    return os.environ.get("CLIPWORKS_MODEL") or DEFAULT_MODEL


def hf_endpoint() -> str:
    """The Hugging Face hub to pull ready bundles from; tests point it at a local server."""
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT_DEFAULT).rstrip("/")


def hf_hub_cache() -> Path:
    """The huggingface_hub cache, read when a bundle was fetched there before (no download needed)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME")
    return (Path(hf_home).expanduser() if hf_home else Path.home() / ".cache" / "huggingface") / "hub"


def offline() -> bool:
    """True when the user asked for no network (``CLIPWORKS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(k, "").lower() in {"1", "true", "yes"} for k in ("CLIPWORKS_OFFLINE", "HF_HUB_OFFLINE"))


def db_path() -> Path:
    """The photo library database (``CLIPWORKS_DB``, else ``$XDG_DATA_HOME/clipworks/library.db``)."""
    env = os.environ.get("CLIPWORKS_DB")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "clipworks" / "library.db"


def tags_cache_dir() -> Path:
    """Cached tag-vocabulary embeddings for interrogation (under the cache dir)."""
    return cache_dir() / "tags"


def api_key() -> str | None:
    """The HTTP service's bearer token (``CLIPWORKS_API_KEY``); None leaves the service open."""
    return os.environ.get("CLIPWORKS_API_KEY") or None


def demo_video() -> Path | None:
    """The video behind ``clipworks stream --input demo`` (``CLIPWORKS_DEMO_VIDEO``); None: a synthetic clip."""
    env = os.environ.get("CLIPWORKS_DEMO_VIDEO")
    return Path(env).expanduser() if env else None
