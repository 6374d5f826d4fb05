"""Whole-or-nothing file writes: a temporary file beside the target, renamed over it only on success.

A reader (or a process killed mid-write) then sees the old file or the new one, never half of one, and a
failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterator
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


@contextmanager
def held_lock(lock_file: Path, waiting: Callable[[str], None] = lambda _holder: None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (made if missing); ``waiting`` is told the holder's pid
    (or "") once, when another process has it.

    ``flock`` is released by the kernel when its holder exits, killed or not, so no stale lock survives
    a crash. Where the lock file cannot be made (a read-only folder) or there is no ``fcntl`` (Windows),
    the caller goes on without it.
    """
    try:
        import fcntl

        fd: int | None = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except (ImportError, OSError):
        fd = None
    if fd is None:  # outside the except clause: the caller's own errors do not chain to this one
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting(os.pread(fd, 20, 0).decode(errors="replace").strip())
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
