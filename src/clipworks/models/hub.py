"""Ready Immich-layout bundles from a Hugging Face hub, through ``huggingface_hub.snapshot_download``.

Bundles are downloaded into the huggingface_hub cache (``settings.hf_hub_cache()``) in its own layout, so
they are shared with other tools, resumed after an interruption, and one snapshot is one commit:
``snapshot_download`` resolves ``main`` to a commit once and fetches every file at that commit, so a
repository updated during a pull cannot mix revisions. It sends the token to the hub only, never to the
storage host a file redirects to. The settings it needs (endpoint, cache, token) are read by
``clipworks.settings`` at call time and passed to it explicitly.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from clipworks import settings
from clipworks.errors import BadBundle, DownloadError

REVISION = "main"

# What the runtime reads from an Immich bundle. A snapshot missing any of them is partial (an interrupted
# pull, or a repository that is not a CLIP bundle) and is never used as a model.
BUNDLE_FILES = (
    "config.json",
    "visual/model.onnx",
    "visual/preprocess_cfg.json",
    "textual/model.onnx",
    "textual/tokenizer.json",
)
# config.json and the files directly under visual/ and textual/. fnmatch's "*" crosses "/", so the ignore
# pattern drops what Immich compiles for other runtimes one folder deeper (visual/rknpu/rk3588/model.rknn,
# textual/fp16/model.armnn).
ALLOW_PATTERNS = ["config.json", "visual/*", "textual/*"]
IGNORE_PATTERNS = ["*/*/*"]


def repo_cache_dir(repo: str) -> Path:
    """Where huggingface_hub keeps ``repo``: ``models--ORG--NAME`` under the hub cache (its documented layout)."""
    return settings.hf_hub_cache() / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo: str) -> Path | None:
    """The snapshot of ``repo`` that ``main`` points at in the huggingface_hub cache, None if there is none.

    Read from the cache layout (``refs/main`` names the commit, ``snapshots/<commit>`` holds its files)
    rather than through huggingface_hub, so loading a model by name never imports it. Raises ``BadBundle``
    when that snapshot lacks a file the runtime needs.
    """
    root = repo_cache_dir(repo)
    try:
        commit = (root / "refs" / REVISION).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise BadBundle(f"cannot read {root / 'refs' / REVISION} ({e}); delete {root} and pull again") from e
    snapshot = root / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return None
    return _require_complete(repo, snapshot)


def _require_complete(repo: str, snapshot: Path) -> Path:
    missing = [f for f in BUNDLE_FILES if not (snapshot / f).is_file()]
    if missing:
        raise BadBundle(
            f"the snapshot of {repo} in {snapshot} is incomplete ({', '.join(missing)} missing): "
            "an interrupted download, or a repository without an Immich CLIP bundle; pull it again with network access"
        )
    return snapshot


def download_snapshot(repo: str, *, force: bool = False) -> Path:
    """Download the runtime files of ``repo`` at one commit of ``main``; the complete snapshot folder.

    Files already in the cache at that commit are not fetched again (unless ``force``); an interrupted
    download resumes. Raises ``DownloadError`` with one line naming the repository and the cause.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    endpoint = settings.hf_endpoint()
    options: dict[str, Any] = {
        "revision": REVISION,
        "cache_dir": settings.hf_hub_cache(),
        "endpoint": endpoint,
        # False rather than None: given None, huggingface_hub would read the token file of the HF_HOME it saw
        # when first imported, which may not be the one settings.hf_token() looked in.
        "token": settings.hf_token() or False,
        "allow_patterns": ALLOW_PATTERNS,
        "ignore_patterns": IGNORE_PATTERNS,
        "force_download": force,
    }
    where = f"{endpoint}/{repo}"
    try:
        folder = huggingface_hub.snapshot_download(repo, **options)
    except hub_errors.RepositoryNotFoundError as e:  # also gated and private repositories (401, 403, 404)
        raise DownloadError(
            f"{where} answered HTTP {_status(e)}: no such model repository, or HF_TOKEN may not read it"
        ) from e
    except hub_errors.RevisionNotFoundError as e:
        raise DownloadError(f"{where} has no {REVISION!r} revision") from e
    except hub_errors.HfHubHTTPError as e:
        raise DownloadError(f"{where} answered HTTP {_status(e)}; try the pull again later") from e
    except hub_errors.LocalEntryNotFoundError as e:
        # What snapshot_download raises when the hub cannot be reached and the cache has nothing.
        raise DownloadError(
            f"cannot reach {endpoint} ({_root_cause(e)}); check the network or HF_ENDPOINT, "
            "or pass --model PATH to a bundle folder you already have"
        ) from e
    except (OSError, *_transport_errors()) as e:  # a full disk, a cut connection, a size not the hub's
        raise DownloadError(f"download of {where} failed ({_root_cause(e)}); run the pull again to resume") from e
    return _require_complete(repo, Path(folder))


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's network errors, which are not OSError and which huggingface_hub lets through once its
    retries are spent: httpx2's (huggingface_hub 2.x) or httpx's (1.x)."""
    found = []
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(getattr(response, "status_code", "error"))


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message, on one line: huggingface_hub wraps the network error it met."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
