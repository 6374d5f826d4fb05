"""Paths and defaults. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

from clipworks.errors import DownloadError

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


# The Hugging Face variables below are read the way huggingface_hub's ``constants.py`` reads them, but at
# call time rather than once at import: clipworks then looks for bundles where huggingface_hub would put
# them, and passes the same values to it explicitly (its own copies are frozen when it is first imported).
_TRUE = {"1", "on", "yes", "true"}


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(os.path.expandvars(value)).expanduser() if value else None


def hf_endpoint() -> str:
    """The Hugging Face hub to pull ready bundles from (``HF_ENDPOINT``: a mirror, or a test server)."""
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT_DEFAULT).rstrip("/")


def hf_home() -> Path:
    """``HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``."""
    return _env_path("HF_HOME") or (_env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"


def hf_hub_cache() -> Path:
    """The huggingface_hub cache, where hub bundles are downloaded and found again.

    ``HF_HUB_CACHE``, else the older ``HUGGINGFACE_HUB_CACHE``, else ``hf_home()/hub``.
    """
    return _env_path("HF_HUB_CACHE") or _env_path("HUGGINGFACE_HUB_CACHE") or hf_home() / "hub"


def hf_token_path() -> Path:
    """The token file ``hf auth login`` writes: ``HF_TOKEN_PATH``, else ``hf_home()/token``."""
    return _env_path("HF_TOKEN_PATH") or hf_home() / "token"


def hf_token() -> str | None:
    """The hub token: ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), else the content of
    ``hf_token_path()``; None when there is none."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        path = hf_token_path()
        try:
            token = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise DownloadError(
                f"cannot read the hub token file {path} ({e}); fix or remove it, or set HF_TOKEN"
            ) from e
    return token.replace("\r", "").replace("\n", "").strip() or None


def offline() -> bool:
    """True when the user asked for no network: ``CLIPWORKS_OFFLINE``, or huggingface_hub's ``HF_HUB_OFFLINE``
    (and ``TRANSFORMERS_OFFLINE``, which it honours too)."""
    names = ("CLIPWORKS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in names)


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
