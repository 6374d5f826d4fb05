"""Walk photo folders: recursive, hidden names skipped, ``--exclude`` globs, symlink loops visited once.

Only ``stat`` is read here (size and mtime tell a changed file); content hashes are computed lazily, for
the few new files that might be a moved or copied one (a stored file of the same size exists).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from clipworks.errors import UsageError
from clipworks.imaging import IMAGE_EXTENSIONS

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


@functools.cache
def library_extensions() -> frozenset[str]:
    """The image extensions, plus HEIC/HEIF when pillow-heif is installed and AVIF when Pillow reads it."""
    extensions = set(IMAGE_EXTENSIONS)
    try:
        import pillow_heif  # type: ignore[import-not-found]

        pillow_heif.register_heif_opener()
        extensions |= {".heic", ".heif"}
    except ImportError:
        pass
    try:
        from PIL import features

        if features.check("avif"):
            extensions.add(".avif")
    except Exception:  # an old Pillow without the feature name
        pass
    return frozenset(extensions)


def resolve_root(folder: str | Path) -> str:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass folders of photos")
    return str(path.resolve())


def excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    """A glob matches the path relative to the root (``raw/*``) or the bare name (``*.gif``, ``thumbs``)."""
    return any(fnmatch(rel, p) or fnmatch(name, p) for p in patterns)


def walk(root: str, excludes: Sequence[str] = ()) -> Iterator[FileStat]:
    """Yield every image file under ``root`` with its size and mtime; unreadable entries are skipped."""
    extensions = library_extensions()
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        # Following symlinked folders can loop (a/link -> a); each real folder is walked once.
        key = (info.st_dev, info.st_ino)
        if key in seen_dirs:
            continue
        seen_dirs.add(key)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        entries.sort(key=lambda e: e.name)
        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = f"{rel_folder}/{name}" if rel_folder else name
            if excludes and excluded(rel, name, excludes):
                continue
            try:
                if entry.is_dir():
                    subfolders.append((entry.path, rel))
                    continue
                if os.path.splitext(name)[1].lower() not in extensions or not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:  # a broken link, a file removed while walking
                continue
            yield FileStat(entry.path, st.st_size, st.st_mtime_ns)
        stack.extend(reversed(subfolders))  # popped in name order


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b-128 of the bytes: tells a moved or copied photo from a new one."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
