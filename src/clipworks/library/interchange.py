"""Vectors in and out of the library: Sophgo ``embeddings.pkl``, ``.npy`` + paths, Parquet, and the
``ClipItems`` SQLite table of Horizon Robotics' CLIP ROS package (image rows ``type=1``, ``url`` the path,
``feature`` raw native float32)."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.library.store import TEXT_ARG, ModelRow, Store, from_bytes, now, read_only_uri, to_blob, to_bytes

FORMATS = ("pkl", "npy", "parquet", "clipitems")
CLIPITEMS_SUFFIXES = (".db", ".sqlite", ".sqlite3")
CLIPITEMS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ClipItems (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER, "
    "type BOOLEAN, name TEXT, text TEXT, url TEXT, feature BLOB, extra TEXT)"
)


@dataclass
class ImportReport:
    imported: int
    missing: int  # paths that do not exist on this machine (kept, searchable, never rescanned)


def format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in CLIPITEMS_SUFFIXES:
        return "clipitems"
    if suffix.lstrip(".") in FORMATS:
        return suffix.lstrip(".")
    raise UsageError(f"cannot tell the format of {path}: name it .pkl, .npy, .parquet or .db, or pass --format")


def export_vectors(store: Store, model: ModelRow, out: str | Path, fmt: str | None = None) -> tuple[int, list[Path]]:
    """Write every present file's vector for ``model``; returns (count, files written)."""
    from clipworks.outputs import write_embeddings

    out = Path(out).expanduser()
    kind = format_of(out, fmt)
    with store.snapshot():
        ids, matrix = store.live_vectors(model)
        names = store.paths_of(ids)
    paths = [names[int(i)] for i in ids]
    if kind == "clipitems":
        if out.suffix.lower() not in CLIPITEMS_SUFFIXES:
            raise UsageError(f"a ClipItems database must end in {', '.join(CLIPITEMS_SUFFIXES)}, not {out.name}")
        return len(paths), [write_clipitems(out, paths, matrix)]
    if out.suffix.lower() != f".{kind}":
        raise UsageError(f"--format {kind} writes a .{kind} file; name the output {out.with_suffix('.' + kind)}")
    return len(paths), write_embeddings(out, paths, matrix)


def write_clipitems(out: Path, paths: list[str], matrix: np.ndarray) -> Path:
    """A fresh ClipItems database (written beside, then renamed into place)."""
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} for {out.name} does not exist; create it first")
    with atomic_path(out) as tmp:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute(CLIPITEMS_SCHEMA)
            stamp = int(time.time() * 1000)
            native = np.ascontiguousarray(matrix, dtype=np.float32)  # native byte order, as the C++ node reads it
            # Names as their bytes, as the C++ node opens them (a name that is not UTF-8 stays exact).
            conn.executemany(
                "INSERT INTO ClipItems (timestamp, type, name, text, url, feature, extra) "
                f"VALUES (?, 1, {TEXT_ARG}, '', {TEXT_ARG}, ?, '')",
                [(stamp, to_bytes(os.path.basename(p)), to_bytes(p), native[i].tobytes()) for i, p in enumerate(paths)],
            )
            conn.commit()
        finally:
            conn.close()
    return out


def read_clipitems(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
        conn.text_factory = from_bytes
        try:
            rows = conn.execute(
                "SELECT COALESCE(NULLIF(url, ''), name), feature FROM ClipItems WHERE type = 1 AND feature IS NOT NULL "
                "ORDER BY id"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not a ClipItems database ({e})") from e
    sizes = {len(blob) for _, blob in rows}
    if len(sizes) > 1 or any(s % 4 for s in sizes):
        raise ClipworksError(f"{path} mixes feature sizes {sorted(sizes)} bytes; expected one float32 length")
    dim = sizes.pop() // 4 if sizes else 0
    matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(-1, dim) if rows else None
    return [p for p, _ in rows], matrix if matrix is not None else np.zeros((0, 0), np.float32)


def read_vectors(path: str | Path, fmt: str | None = None) -> tuple[list[str], np.ndarray]:
    from clipworks.outputs import read_embeddings

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if format_of(path, fmt) == "clipitems":
        return read_clipitems(path)
    return read_embeddings(path)


def import_vectors(store: Store, model: ModelRow, file: str | Path, fmt: str | None = None) -> ImportReport:
    """Add the vectors in ``file`` to the library as ``model``'s, after checking their dimension."""
    paths, matrix = read_vectors(file, fmt)
    if not paths:
        return ImportReport(0, 0)
    if matrix.ndim != 2 or matrix.shape[1] != model.dim:
        got = matrix.shape[1] if matrix.ndim == 2 else matrix.shape
        raise ClipworksError(
            f"{file} holds {got}-d embeddings but {model.name} makes {model.dim}-d ones; import it into a library "
            "of the model that made it (--model NAME)"
        )
    # Search scores are dot products of unit vectors; rows already unit length are kept bit for bit.
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    off = np.abs(norms - 1.0) > 1e-5
    matrix = np.where(off, matrix / np.maximum(norms, 1e-12), matrix).astype(np.float32)
    t = now()
    missing = 0
    with store.write() as db:
        for raw, vector in zip(paths, matrix, strict=True):
            path = os.path.abspath(os.path.expanduser(str(raw)))
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
                missing += 1
            file_id = db.execute(
                f"INSERT INTO files (path, size, mtime_ns, updated_at) VALUES ({TEXT_ARG}, ?, ?, ?) ON CONFLICT(path) "
                "DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, hash = NULL, error = NULL, "
                "deleted_at = NULL, updated_at = excluded.updated_at RETURNING id",
                (to_bytes(path), size, mtime, t),
            ).fetchone()[0]
            db.execute(
                "INSERT OR REPLACE INTO embeddings (model_id, file_id, vector) VALUES (?, ?, ?)",
                (model.id, file_id, to_blob(vector)),
            )
    return ImportReport(len(paths), missing)
