"""Result folders: links ``0.<ext>``, ``1.<ext>``, ... to the hits, in rank order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from clipworks.errors import UsageError


def write_results(folder: str | Path, paths: Sequence[str]) -> list[Path]:
    """Empty ``folder`` of its links and link the hits into it. A folder holding anything but links is
    refused: pointing ``--results`` at a photo folder by mistake must not delete photos."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--results {folder} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    entries = list(folder.iterdir())
    kept = [e for e in entries if not e.is_symlink()]
    if kept:
        raise UsageError(
            f"--results {folder} holds {len(kept)} entries that are not links (e.g. {kept[0].name}); "
            "pass an empty or new folder"
        )
    for entry in entries:
        entry.unlink()
    links = []
    for rank, path in enumerate(paths):
        link = folder / f"{rank}{Path(path).suffix}"
        os.symlink(os.path.abspath(path), link)
        links.append(link)
    return links
