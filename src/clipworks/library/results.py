"""Result folders as D-Robotics' hobot_clip node ``clip_manage`` writes them: ``0.jpg``, ``1.jpg``, ... in rank
order. The ``index.html`` the robot ships (kept beside the folder, not in it) lists the folder and shows the
names ending in jpg, jpeg, png or gif.

A JPEG hit is a link to the photo, as the robot makes. The robot also links other formats under a ``.jpg``
name, which only a browser that sniffs the bytes shows, and never a HEIC or TIFF; clipworks writes those
as a JPEG copy instead, so every ``<i>.jpg`` is a JPEG that any page or viewer opens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clipworks.errors import BadImage, ClipworksError, UsageError

# Longest side of a JPEG copy: sharp on any screen, yet a huge scan never becomes a huge copy.
COPY_SIZE = 2048
COPY_QUALITY = 90
# A JPEG comment marking the copies clipworks wrote, so that the next run removes those and no photo of
# yours: the folder then holds the robot's names and nothing else.
COPY_MARK = b"clipworks result copy"
RESULT_NAME = re.compile(r"[0-9]+\.jpg")
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI and the first marker: every JPEG (JFIF, Exif, MPO) starts so


@dataclass
class ResultsReport:
    written: list[Path]  # <rank>.jpg, in rank order
    converted: int = 0  # hits written as JPEG copies (not JPEG files themselves)
    undecodable: list[str] = field(default_factory=list)  # neither JPEG nor decodable: linked, as the robot does


def write_results(folder: str | Path, paths: Sequence[str]) -> ResultsReport:
    """Empty ``folder`` of what an earlier run wrote there and write ``<rank>.jpg`` per hit. A folder
    holding anything else is refused before anything is removed: pointing it at a photo folder by mistake
    must not delete photos."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"result folder {folder} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _empty(folder)
    report = ResultsReport([folder / f"{rank}.jpg" for rank in range(len(paths))])
    for path, target in zip(paths, report.written, strict=True):
        if _is_jpeg(path):
            os.symlink(os.path.abspath(path), target)
            continue
        try:
            _write_copy(path, target)
            report.converted += 1
        except BadImage:
            os.symlink(os.path.abspath(path), target)
            report.undecodable.append(path)
    return report


def _empty(folder: Path) -> None:
    entries = list(folder.iterdir())
    foreign = [e for e in entries if not (e.is_symlink() or _is_our_copy(e))]
    if foreign:
        raise UsageError(
            f"result folder {folder} holds {len(foreign)} entries that are not links or copies clipworks wrote "
            f"(e.g. {foreign[0].name}); pass an empty or new folder"
        )
    for entry in entries:
        entry.unlink()


def _is_our_copy(entry: Path) -> bool:
    """A result name holding a JPEG with clipworks' mark, or nothing at all (a copy cut short at its start:
    an empty file holds nothing to lose). Pillow reads the header only, not the pixels."""
    if not (RESULT_NAME.fullmatch(entry.name) and entry.is_file()):
        return False
    try:
        if entry.stat().st_size == 0:
            return True
        with Image.open(entry) as image:
            return image.format == "JPEG" and image.info.get("comment") == COPY_MARK
    except Exception:  # unreadable or not an image: not ours, so it stays
        return False


def _is_jpeg(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(JPEG_SIGNATURE)) == JPEG_SIGNATURE
    except OSError:
        return False


def _write_copy(path: str, target: Path) -> None:
    from clipworks.imaging import load_thumbnail
    from clipworks.library.scan import image_extensions

    image_extensions()  # registers HEIC/HEIF decoding when pillow-heif is installed, as indexing does
    # Decoded once under the pixel limit indexing uses, and shrunk before it is encoded: bounded memory.
    image = load_thumbnail(path, COPY_SIZE)
    # Written in place, not renamed into place: a run cut short leaves a result name with the mark (or an
    # empty file), which the next run removes, where a temporary name would be a stranger that stops it.
    try:
        image.save(target, "JPEG", quality=COPY_QUALITY, comment=COPY_MARK)
    except OSError as e:
        target.unlink(missing_ok=True)
        raise ClipworksError(f"cannot write {target} ({e.strerror or e}): check the disk and run again") from e
