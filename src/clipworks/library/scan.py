"""The one walk over image folders (the library's index and ``embed images`` alike): recursive, hidden names
skipped, exclude globs, symlinks by policy, loops visited once, one set of image extensions (the library
adds the video ones: `library_extensions`), and a camera RAW beside a developed copy of the same name
(``IMG_1.CR2`` and ``IMG_1.JPG``) found once, as the copy.

Only ``stat`` is read here (size and mtime tell a changed file); content hashes are computed lazily, for
the few new files that might be a moved or copied one (a stored file of the same size exists).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from clipworks.errors import UsageError
from clipworks.imaging import IMAGE_EXTENSIONS, RAW_EXTENSIONS, raw_supported

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStat:
    """One image file as the walk found it. ``dev`` and ``ino`` name the very file (a server later opens
    that one or nothing); ``target`` is its real path when a symlink on the way leads elsewhere."""

    path: str
    size: int
    mtime_ns: int
    dev: int
    ino: int
    target: str | None


@dataclass(frozen=True)
class SkippedFolder:
    """A folder the walk did not enter: ``unreadable`` (listing it failed, ``detail`` says why) or
    ``outside`` (a symlink whose real folder, ``detail``, lies outside the root and links are not followed)."""

    path: str
    kind: Literal["unreadable", "outside"]
    detail: str


@functools.cache
def image_extensions() -> frozenset[str]:
    """The image extensions, plus HEIC/HEIF when pillow-heif is installed, AVIF when Pillow reads it and
    the camera RAW ones when rawpy is (`clipworks.imaging.RAW_EXTENSIONS`).

    Registering pillow-heif's opener here is what lets the decoder open the HEIC files the walk finds.
    """
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
    if raw_supported():
        extensions |= RAW_EXTENSIONS
    return frozenset(extensions)


def developed_stems(names: Sequence[str], extensions: frozenset[str]) -> frozenset[str]:
    """The stems of the ``names`` that are images but no RAW: a RAW of one of these stems is the same
    picture, already developed (rclip's rule: the camera's or the editor's JPEG is what the photographer
    kept). The stem is compared as written, the extension in any case (``.JPG``, ``.jpg``)."""
    stems = set()
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions and ext.lower() not in RAW_EXTENSIONS:
            stems.add(stem)
    return frozenset(stems)


def library_extensions() -> frozenset[str]:
    """What the library indexes: photos and videos."""
    from clipworks.video.frames import VIDEO_EXTENSIONS

    return image_extensions() | VIDEO_EXTENSIONS


def resolve_root(folder: str | Path) -> str:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass folders of photos")
    return str(path.resolve())


def excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    """A glob matches the path relative to the root (``raw/*``) or the bare name (``*.gif``, ``thumbs``)."""
    return any(fnmatch(rel, p) or fnmatch(name, p) for p in patterns)


def excluded_path(root: str, path: str, patterns: Sequence[str]) -> bool:
    """Whether the walk of ``root`` skips ``path`` for one of ``patterns`` (at the file or a folder above it)."""
    parts = os.path.relpath(path, root).split(os.sep)
    return any(excluded("/".join(parts[: i + 1]), part, patterns) for i, part in enumerate(parts))


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk(
    root: str,
    excludes: Sequence[str] = (),
    *,
    follow_links: bool = False,
    recursive: bool = True,
    on_skip: Callable[[SkippedFolder], None] | None = None,
    extensions: frozenset[str] | None = None,
) -> Iterator[FileStat]:
    """Yield every image file under ``root`` with its size, mtime and identity; paths start with ``root``
    as given (the library passes resolved roots). Subfolders are entered only when ``recursive``.

    Only regular files count: a symlink to a file is followed when its target is one (whether it decodes
    as an image is the embedder's check). A symlinked folder is followed when its real folder lies inside
    ``root``, anywhere with ``follow_links``; either way each real folder is walked once, so links cannot
    loop, and linked folders come after the real tree. Folders that cannot be listed, and links not
    followed, go to ``on_skip``. ``extensions`` (default: `image_extensions`) says which files count.
    """
    extensions = extensions or image_extensions()
    skip = on_skip or (lambda folder: None)
    seen_dirs: set[tuple[int, int]] = set()
    real_root = os.path.realpath(root)
    stack: list[tuple[str, str, str]] = [(root, "", real_root)]  # (path as reached, relative path, real path)
    # Linked folders wait until the real tree is walked, so a folder is recorded under its own name
    # rather than under a link that happens to sort first.
    linked: deque[tuple[str, str, str]] = deque()
    while stack or linked:
        folder, rel_folder, real_folder = stack.pop() if stack else linked.popleft()
        try:
            info = os.stat(folder)
            key = (info.st_dev, info.st_ino)
            if key in seen_dirs:
                continue
            seen_dirs.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skip(SkippedFolder(folder, "unreadable", e.strerror or str(e)))
            continue
        subfolders: list[tuple[str, str, str]] = []
        # Only names the walk itself yields count as developed copies, so that one of a pair is always found
        # (an excluded or hidden JPEG leaves its RAW to stand for the picture).
        kept = [
            e for e in entries
            if not e.name.startswith(".")
            and not (excludes and excluded(f"{rel_folder}/{e.name}" if rel_folder else e.name, e.name, excludes))
        ]  # fmt: skip
        developed = developed_stems([e.name for e in kept], extensions)
        for entry in kept:
            name = entry.name
            rel = f"{rel_folder}/{name}" if rel_folder else name
            try:
                link = entry.is_symlink()
                if entry.is_dir():
                    real = os.path.realpath(entry.path) if link else os.path.join(real_folder, name)
                    if not recursive:
                        continue
                    if not link:
                        subfolders.append((entry.path, rel, real))
                    elif follow_links or is_within(real, real_root):
                        linked.append((entry.path, rel, real))
                    else:
                        skip(SkippedFolder(entry.path, "outside", real))
                    continue
                stem, ext = os.path.splitext(name)
                if ext.lower() not in extensions or not entry.is_file():
                    continue  # is_file() follows a link and is true for regular files only: no FIFOs, devices
                if ext.lower() in RAW_EXTENSIONS and stem in developed:
                    continue
                st = entry.stat()
                real = os.path.realpath(entry.path) if link else os.path.join(real_folder, name)
            except OSError:  # a broken link, a file removed while walking
                continue
            target = real if real != os.path.abspath(entry.path) else None
            yield FileStat(entry.path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, target)
        stack.extend(reversed(subfolders))  # popped in name order


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b-128 of the bytes: tells a moved or copied photo from a new one."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
