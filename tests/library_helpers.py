"""Helpers shared by the library tests: folders of real photos and their distinct variants."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image


def copy_photos(photos: list[Path], folder: Path) -> Path:
    """``folder`` (made here) holding a copy of each photo."""
    folder.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, folder / p.name)
    return folder


def make_variants(photos: list[Path], folder: Path, count: int, size: int = 320, fmt: str = "jpg") -> list[Path]:
    """``count`` distinct real-photo files (crops and flips of the sample photos, cycled)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    sources = [Image.open(p).convert("RGB") for p in photos]
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        shift = (i // len(sources)) * 7 % max(1, min(w, h) // 4)
        variant = image.crop((shift, shift, w - shift // 2, h - shift // 3)).resize((size, size * 3 // 4))
        if (i // len(sources)) % 2:
            variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"v{i:03d}.{fmt}"
        variant.save(path)
        out.append(path)
    return out


def stored_vectors(db: Path) -> dict[str, np.ndarray]:
    """Path -> vector of every present file, read straight from SQLite (independent of the library code)."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT f.path, e.vector FROM embeddings e JOIN files f ON f.id = e.file_id WHERE f.deleted_at IS NULL"
        ).fetchall()
    finally:
        conn.close()
    return {p: np.frombuffer(v, dtype="<f4") for p, v in rows}


def file_ids(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT path, id FROM files").fetchall())
    finally:
        conn.close()
