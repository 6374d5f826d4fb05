"""Fetch ready Immich-layout bundles from a Hugging Face hub, or find them in its local cache.

Plain ``urllib`` against the hub's public HTTP API, so pulling needs neither torch nor
huggingface_hub; ``HF_ENDPOINT`` points it elsewhere (a mirror, or a test server).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from clipworks import settings
from clipworks.errors import DownloadError

TIMEOUT_S = 60
CHUNK = 1 << 20


def _request(url: str) -> urllib.request.Request:
    headers = {"User-Agent": "clipworks"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _wanted(rfilename: str) -> bool:
    """The files the runtime reads: config.json and the files directly under visual/ and textual/.

    Immich repositories also hold compiled graphs for other runtimes (``visual/rknpu/...``); skip those.
    """
    parts = rfilename.split("/")
    if parts == ["config.json"]:
        return True
    return len(parts) == 2 and parts[0] in {"visual", "textual"}


def list_repo_files(repo: str, revision: str = "main") -> list[str]:
    url = f"{settings.hf_endpoint()}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}"
    try:
        with urllib.request.urlopen(_request(url), timeout=TIMEOUT_S) as response:
            info = json.load(response)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url} answered HTTP {e.code}: is {repo!r} a public model repository?") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DownloadError(
            f"cannot reach {settings.hf_endpoint()} ({getattr(e, 'reason', e)}); check the network or HF_ENDPOINT, "
            "or pass --model PATH to a bundle folder you already have"
        ) from e
    except json.JSONDecodeError as e:
        raise DownloadError(f"{url} did not answer JSON; is HF_ENDPOINT a Hugging Face hub?") from e
    files = [s["rfilename"] for s in info.get("siblings", []) if _wanted(s.get("rfilename", ""))]
    if "config.json" not in files or "visual/model.onnx" not in files:
        raise DownloadError(f"{repo} has no Immich CLIP bundle (config.json and visual/model.onnx expected)")
    return sorted(files)


def download_file(url: str, dest: Path, progress: Callable[[int, int | None], None] | None = None) -> None:
    """Stream to ``dest.part`` and rename, so an interrupted download never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(_request(url), timeout=TIMEOUT_S) as response, part.open("wb") as fh:
            total = response.headers.get("Content-Length")
            total_bytes = int(total) if total and total.isdigit() else None
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                if progress:
                    progress(len(chunk), total_bytes)
        if total_bytes is not None and part.stat().st_size != total_bytes:
            raise DownloadError(f"{url} ended after {part.stat().st_size} of {total_bytes} bytes; run the pull again")
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} answered HTTP {e.code}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} failed ({getattr(e, 'reason', e)}); run the pull again") from e
    part.replace(dest)


def download_bundle(repo: str, dest: Path, revision: str = "main", show_progress: bool = True) -> Path:
    """Download every runtime file of ``repo`` into ``dest`` (atomically: a temp folder, then a rename)."""
    from tqdm import tqdm

    files = list_repo_files(repo, revision)
    work = dest.parent / f".{dest.name}.download-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    base = f"{settings.hf_endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}"
    try:
        with tqdm(unit="B", unit_scale=True, desc=repo, disable=not show_progress, leave=False) as bar:
            for name in files:

                def advance(n: int, total: int | None) -> None:
                    bar.update(n)

                download_file(f"{base}/{name}", work / name, advance)
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def find_in_hf_cache(repo: str) -> Path | None:
    """A complete snapshot of ``repo`` already in the huggingface_hub cache (the ``main`` ref first)."""
    root = settings.hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    candidates += sorted(p for p in snapshots.iterdir() if p.is_dir())
    for snap in candidates:
        if (snap / "config.json").is_file() and (snap / "visual" / "model.onnx").is_file():
            return snap
    return None
