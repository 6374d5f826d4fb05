"""Whole-or-nothing file writes: a temporary file beside the target, renamed over it only on success.

A reader (or a process killed mid-write) then sees the old file or the new one, never half of one, and a
failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` (keeping ``target``'s mode).

    ``suffix`` ends the temporary name, for writers that pick a format from it (``.mp4``).
    """
    target = Path(target)
    # Same folder, so the rename is atomic on one filesystem; a unique name, so writers never collide.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8, flushed to disk before the rename (prompt files, bundle configs)."""
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
