"""Vectors in and out of the library: Sophgo ``embeddings.pkl``, ``.npy`` + paths, Parquet, and the
``ClipItems`` SQLite table of D-Robotics' (Horizon Robotics') hobot_clip ROS node ``clip_manage`` (image
rows ``type=1``, ``url`` the path, ``feature`` 512 raw native float32).

A video moment is exported as ``video.mp4#t=SECONDS`` (a media-fragment URI, what a player starts at), with
the seconds also in Parquet's ``time`` column; a ClipItems database gets photos only, since clip_manage
shows every row as an image."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.library.metadata import METADATA_COLUMNS, Metadata
from clipworks.library.store import (
    TEXT_ARG,
    ModelRow,
    Store,
    Target,
    from_bytes,
    now,
    read_only_uri,
    to_blob,
    to_bytes,
)
from clipworks.video.frames import is_video

FORMATS = ("pkl", "npy", "parquet", "clipitems")
CLIPITEMS_SUFFIXES = (".db", ".sqlite", ".sqlite3")
# clip_manage's own table (ClipItemDatabase::createTable in src/database.cpp).
CLIPITEMS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ClipItems (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER, "
    "type BOOLEAN, name TEXT, text TEXT, url TEXT, feature BLOB, extra TEXT)"
)
ROBOT_COLUMNS = frozenset({"id", "timestamp", "type", "name", "text", "url", "feature", "extra"})
# clip_manage's cosine_similarity reads 512 floats of every image row, whatever the row holds.
ROBOT_DIM = 512
KEEP_ROBOT_DB = "it is left as it was; export to a new .db file or to the robot's own clip.db"
# How a video moment is named in an interchange file: a media fragment (`export_vectors`).
MOMENT_PATH = re.compile(r"(.+)#t=([0-9]+(?:\.[0-9]*)?)", re.S)


@dataclass
class ExportReport:
    count: int  # vectors written; into an existing ClipItems database, the rows added
    written: list[Path]
    skipped: int = 0  # photos whose url the ClipItems database already held: its row is kept as it was
    merged: bool = False  # the rows went into an existing ClipItems database


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


class ExportSource(Protocol):
    """What an export reads: SQLite's `Store` and Postgres' `PostgresStore` are both one."""

    def snapshot(self) -> AbstractContextManager[Any]: ...
    def live_vectors(self, model: ModelRow) -> tuple[np.ndarray, np.ndarray]: ...
    def targets(self, model: ModelRow, keys: Sequence[int]) -> dict[int, Target]: ...
    def metadata_of(self, file_ids: Sequence[int]) -> dict[int, Metadata]: ...


def export_vectors(store: ExportSource, model: ModelRow, out: str | Path, fmt: str | None = None) -> ExportReport:
    """Write every present file's vector for ``model``; a ClipItems database that exists gets the rows it lacks."""
    from clipworks.outputs import write_embeddings

    out = Path(out).expanduser()
    kind = format_of(out, fmt)
    if kind == "clipitems":
        if out.suffix.lower() not in CLIPITEMS_SUFFIXES:
            raise UsageError(f"a ClipItems database must end in {', '.join(CLIPITEMS_SUFFIXES)}, not {out.name}")
        check_robot_dim(model.name, model.dim)
    elif out.suffix.lower() != f".{kind}":
        raise UsageError(f"--format {kind} writes a .{kind} file; name the output {out.with_suffix('.' + kind)}")
    with store.snapshot():
        keys, matrix = store.live_vectors(model)
        if kind == "clipitems":
            photos = int(np.searchsorted(keys, 1))  # moment keys are negative: they sort first
            keys, matrix = keys[photos:], matrix[photos:]
        found = store.targets(model, keys)
        described = store.metadata_of([t.file_id for t in found.values()]) if kind == "parquet" else {}
    targets = [found[int(k)] for k in keys]
    paths = [t.path if t.time is None else f"{t.path}#t={t.time:.3f}" for t in targets]  # see MOMENT_PATH
    if kind == "clipitems":
        return write_clipitems(out, paths, matrix)
    columns = None
    if kind == "parquet":
        columns = metadata_columns([t.path for t in targets], [described.get(t.file_id) for t in targets])
        columns["time"] = [t.time for t in targets]
    return ExportReport(len(paths), write_embeddings(out, paths, matrix, columns))


def metadata_columns(paths: list[str], described: list[Metadata | None]) -> dict[str, list[Any]]:
    """The Parquet columns of each photo's metadata (null where unknown or not read yet): the stored
    columns, ``taken`` as ISO 8601 with its offset, and ``folder``."""
    columns: dict[str, list[Any]] = {name: [getattr(m, name, None) for m in described] for name in METADATA_COLUMNS}
    columns["taken"] = [m.taken_iso() if m else None for m in described]
    # Parquet strings are UTF-8: a folder whose name is not shows U+FFFD there (``path_bytes`` is exact).
    columns["folder"] = [to_bytes(os.path.dirname(p)).decode("utf-8", "replace") for p in paths]
    return columns


def check_robot_dim(model: str, dim: int) -> None:
    if dim != ROBOT_DIM:
        raise ClipworksError(
            f"{model} makes {dim}-d vectors, but robot CLIP's clip_manage reads exactly {ROBOT_DIM} floats per "
            f"image row: index the photos with a {ROBOT_DIM}-d model such as ViT-B-32::openai and export its vectors"
        )


def write_clipitems(out: Path, paths: list[str], matrix: np.ndarray) -> ExportReport:
    """Add an image row per path to the ClipItems database ``out`` as clip_manage's storage mode does: a url
    the database already holds is skipped and every row there is kept. An existing database changes in one
    transaction (a failure leaves it as it was); a new one is written beside and renamed into place."""
    if paths:
        check_robot_dim("these vectors", matrix.shape[1])
    if out.is_dir():
        raise UsageError(f"{out} is a folder; name a ClipItems .db file to write")
    if out.exists():
        check_robot_table(out)
        try:
            added, skipped = _add_items(out, paths, matrix, out)
        except sqlite3.Error as e:
            raise ClipworksError(f"cannot add rows to {out} ({e}); it is left as it was") from e
        return ExportReport(added, [out], skipped, merged=True)
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} for {out.name} does not exist; create it first")
    try:
        with atomic_path(out) as tmp:
            added, _ = _add_items(tmp, paths, matrix, out)
    except sqlite3.Error as e:
        raise ClipworksError(f"cannot write {out} ({e}); nothing was written") from e
    return ExportReport(added, [out])


def check_robot_table(path: Path) -> None:
    """Refuse a file clip_manage could not have written: not SQLite, SQLite with other tables (a clipworks
    library, say), or a ClipItems table of other columns. An empty database (a 0-byte file) passes: it gets
    the robot's table, as clip_manage's start-up gives it. Read as immutable: not even a -shm file appears."""
    try:
        conn = sqlite3.connect(read_only_uri(path, immutable=True), uri=True)
        try:
            tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            columns = {row[1].lower() for row in conn.execute("PRAGMA table_info(ClipItems)")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not a SQLite database ({e}); {KEEP_ROBOT_DB}") from e
    if not columns:
        if set(tables) - {"sqlite_sequence"}:
            raise UsageError(
                f"{path} is a SQLite database without a ClipItems table (it holds {', '.join(sorted(tables))}); "
                f"{KEEP_ROBOT_DB}"
            )
        return
    missing = sorted(ROBOT_COLUMNS - columns)
    if missing:
        raise UsageError(f"{path}'s ClipItems table has no {', '.join(missing)} column: it is not robot CLIP's; "
                         f"{KEEP_ROBOT_DB}")  # fmt: skip


def _check_robot_features(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse to add to a database whose image rows are not 512 floats: the robot did not write them, and
    reads 512 floats of each anyway. Rows it reads as text (type 0; NULL reads as 0) are never read."""
    bad, row_id, size = conn.execute(
        "SELECT COUNT(*), MIN(id), length(feature) FROM ClipItems WHERE type != 0 AND length(feature) IS NOT ?",
        (ROBOT_DIM * 4,),
    ).fetchone()
    if bad:
        found = "no feature" if size is None else f"{size} bytes"
        raise ClipworksError(
            f"{path} holds {bad} image rows whose feature is not {ROBOT_DIM} float32 values (row {row_id}: {found}, "
            f"not {ROBOT_DIM * 4}); clip_manage reads exactly {ROBOT_DIM} floats per row, so rows cannot be added "
            f"to it: {KEEP_ROBOT_DB}"
        )


def _add_items(db: Path, paths: list[str], matrix: np.ndarray, name: Path) -> tuple[int, int]:
    """(rows added, paths skipped because their url is there), committed whole or not at all; ``name`` is
    the database as errors name it (``db`` may be its temporary twin)."""
    native = np.ascontiguousarray(matrix, dtype=np.float32)  # native byte order, as the C++ node reads it
    conn = sqlite3.connect(db, isolation_level=None)
    conn.text_factory = bytes
    try:
        # The write lock before anything is read: nothing the robot stores meanwhile slips in between.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(CLIPITEMS_SCHEMA)
            _check_robot_features(conn, name)
            known = {url for (url,) in conn.execute("SELECT url FROM ClipItems") if url is not None}
            # Names as their bytes, as the C++ node opens them (a name that is not UTF-8 stays exact).
            new = [(i, url) for i, url in enumerate(map(to_bytes, paths)) if url not in known]
            stamp = int(time.time() * 1000)  # milliseconds, as clip_manage stamps its rows
            conn.executemany(
                "INSERT INTO ClipItems (timestamp, type, name, text, url, feature, extra) "
                f"VALUES (?, 1, {TEXT_ARG}, '', {TEXT_ARG}, ?, '')",
                ((stamp, to_bytes(os.path.basename(paths[i])), url, native[i].tobytes()) for i, url in new),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return len(new), len(paths) - len(new)


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
    missing: set[str] = set()
    videos: dict[str, list[tuple[float, np.ndarray]]] = {}
    with store.write() as db:
        for raw, vector in zip(paths, matrix, strict=True):
            moment = MOMENT_PATH.fullmatch(str(raw))
            if moment is not None and is_video(moment.group(1)):
                path = os.path.abspath(os.path.expanduser(moment.group(1)))
                videos.setdefault(path, []).append((float(moment.group(2)), vector))
                continue
            file_id = _import_file(db, os.path.abspath(os.path.expanduser(str(raw))), t, missing)
            db.execute(
                "INSERT OR REPLACE INTO embeddings (model_id, file_id, vector) VALUES (?, ?, ?)",
                (model.id, file_id, to_blob(vector)),
            )
        for path, moments in videos.items():  # a video's moments replace those it had, in time order
            file_id = _import_file(db, path, t, missing)
            db.execute("UPDATE files SET kind = 'video' WHERE id = ?", (file_id,))  # --type video finds it now
            moments.sort(key=lambda m: m[0])
            db.execute("DELETE FROM moments WHERE model_id = ? AND file_id = ?", (model.id, file_id))
            db.executemany(
                "INSERT INTO moments (model_id, file_id, ordinal, time, vector) VALUES (?, ?, ?, ?, ?)",
                [(model.id, file_id, n, at, to_blob(v)) for n, (at, v) in enumerate(moments)],
            )
            # The interval it was sampled at is not in the file: 0 stands for unknown (--video-every resamples).
            db.execute(
                "INSERT OR REPLACE INTO videos (model_id, file_id, every_s, moments) VALUES (?, ?, 0, ?)",
                (model.id, file_id, len(moments)),
            )
    return ImportReport(len(paths), sum(1 for raw in paths if _base(str(raw)) in missing))


def _base(raw: str) -> str:
    """The file a path of an interchange file names (a moment's video without its ``#t=``)."""
    moment = MOMENT_PATH.fullmatch(raw)
    path = moment.group(1) if moment is not None and is_video(moment.group(1)) else raw
    return os.path.abspath(os.path.expanduser(path))


def _import_file(db: Any, path: str, t: float, missing: set[str]) -> int:
    """The id of the files row for ``path``, made or brought back; ``missing`` gets it if it is not here."""
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = -1, -1
        missing.add(path)
    return int(db.execute(
        f"INSERT INTO files (path, size, mtime_ns, updated_at) VALUES ({TEXT_ARG}, ?, ?, ?) ON CONFLICT(path) "
        "DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, hash = NULL, error = NULL, "
        "deleted_at = NULL, updated_at = excluded.updated_at RETURNING id",
        (to_bytes(path), size, mtime, t),
    ).fetchone()[0])  # fmt: skip
