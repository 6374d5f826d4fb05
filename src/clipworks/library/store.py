"""The library database: one SQLite file in WAL mode, a schema version and numbered migrations.

As in rclip's ``db.py`` and llm's ``embeddings_migrations.py``, the schema version lives in the file
(``PRAGMA user_version``) and every migration is a numbered step applied in its own transaction, so a
database written by any earlier clipworks opens and upgrades itself. Vectors are float32 BLOBs stored per
model; a ``generation`` counter goes up with every committed change so that readers in other threads or
processes know when their cached matrix is stale.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipworks.errors import ClipworksError, UsageError

BUSY_TIMEOUT_MS = 30_000
VECTOR_DTYPE = np.dtype("<f4")

# Each entry upgrades the schema by one version; append, never edit a released one.
MIGRATIONS: list[str] = [
    # 1: folders, files (size + mtime for change detection, a content hash for moves), models, vectors.
    """
    CREATE TABLE roots (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        excludes TEXT NOT NULL DEFAULT '[]',
        added_at REAL NOT NULL
    );
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT,
        error TEXT,
        deleted_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX files_size ON files(size);
    CREATE INDEX files_hash ON files(hash);
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        dim INTEGER NOT NULL,
        source TEXT,
        UNIQUE (name, fingerprint)
    );
    CREATE TABLE embeddings (
        model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        vector BLOB NOT NULL,
        PRIMARY KEY (model_id, file_id)
    ) WITHOUT ROWID;
    CREATE INDEX embeddings_file ON embeddings(file_id);
    CREATE TABLE state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO state (key, value) VALUES ('generation', 0);
    """,
    # 2: what each path was when indexed (device, inode, the real path when a link leads there) so that
    # a server opens that very file and nothing swapped in; whether a folder follows links out of itself;
    # a random id telling this database from an earlier one at the same path (it keys the side file).
    """
    ALTER TABLE files ADD COLUMN dev INTEGER;
    ALTER TABLE files ADD COLUMN ino INTEGER;
    ALTER TABLE files ADD COLUMN target TEXT;
    ALTER TABLE roots ADD COLUMN follow_links INTEGER NOT NULL DEFAULT 0;
    INSERT INTO state (key, value) VALUES ('library_id', random() & 9223372036854775807);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class ModelRow:
    id: int
    name: str
    fingerprint: str
    dim: int
    source: str | None


@dataclass(frozen=True)
class FileRow:
    """A file as stat saw it when it was indexed. ``dev`` and ``ino`` are None for rows written before
    schema 2 or imported, until an index run covers them; ``target`` is the real path when the indexed
    path went through a symlink."""

    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str | None
    error: str | None
    deleted_at: float | None
    dev: int | None
    ino: int | None
    target: str | None

    @property
    def real_path(self) -> str:
        return self.target or self.path

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` is this very file, unchanged: device and inode (a freed inode number is soon
        reused, so size and mtime too)."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (self.dev, self.ino, self.size, self.mtime_ns)


FILE_COLUMNS = "id, path, size, mtime_ns, hash, error, deleted_at, dev, ino, target"


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def from_blobs(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    data = b"".join(blobs)
    return np.frombuffer(data, dtype=VECTOR_DTYPE).reshape(-1, dim).astype(np.float32, copy=False)


def prefix_range(root: str) -> tuple[str, str]:
    """Bounds of every path strictly inside ``root`` for an index range scan (``/a/`` up to ``/a0``)."""
    root = root.rstrip(os.sep) or os.sep
    low = root if root.endswith(os.sep) else root + os.sep
    return low, low[:-1] + chr(ord(os.sep) + 1)


class Store:
    """One connection to the library file. Not shared between threads: open one per thread."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            if not create:
                raise UsageError(f"no library at {self.path}: run `clipworks index add DIR` first (or pass --db)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in `write()`.
            self.conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives any crash of the process; only a power cut may drop the last commits.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ClipworksError(f"{self.path} is not a usable clipworks library ({e}); pass another --db") from e

    # -- schema ------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        while True:
            version = self.version
            if version > SCHEMA_VERSION:
                raise ClipworksError(
                    f"{self.path} has schema version {version}, newer than this clipworks ({SCHEMA_VERSION}); "
                    "upgrade clipworks"
                )
            if version == SCHEMA_VERSION:
                return
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if self.version == version:  # another process may have migrated while we waited for the lock
                    for statement in _statements(MIGRATIONS[version]):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version = {version + 1}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that bumps the generation; rolled back whole on any error or Ctrl-C."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed state."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0])

    # -- models ------------------------------------------------------------------------------------
    def models(self) -> list[ModelRow]:
        rows = self.conn.execute("SELECT id, name, fingerprint, dim, source FROM models ORDER BY id").fetchall()
        return [ModelRow(*r) for r in rows]

    def find_model(self, name: str, fingerprint: str) -> ModelRow | None:
        row = self.conn.execute(
            "SELECT id, name, fingerprint, dim, source FROM models WHERE name = ? AND fingerprint = ?",
            (name, fingerprint),
        ).fetchone()
        return ModelRow(*row) if row else None

    def ensure_model(self, name: str, fingerprint: str, dim: int, source: str | None) -> ModelRow:
        found = self.find_model(name, fingerprint)
        if found:
            if found.dim != dim:
                raise ClipworksError(f"{self.path} holds {found.dim}-d vectors for {name} but the model makes {dim}-d")
            return found
        with self.write() as db:
            db.execute(
                "INSERT OR IGNORE INTO models (name, fingerprint, dim, source) VALUES (?, ?, ?, ?)",
                (name, fingerprint, dim, source),
            )
        found = self.find_model(name, fingerprint)
        assert found is not None
        return found

    # -- roots -------------------------------------------------------------------------------------
    def roots(self) -> list[tuple[str, list[str]]]:
        import json

        rows = self.conn.execute("SELECT path, excludes FROM roots ORDER BY path").fetchall()
        return [(p, json.loads(e)) for p, e in rows]

    # -- files -------------------------------------------------------------------------------------
    def files_under(self, root: str) -> list[FileRow]:
        low, high = prefix_range(root)
        rows = self.conn.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE path >= ? AND path < ?", (low, high)
        ).fetchall()
        return [FileRow(*r) for r in rows]

    def file_by_path(self, path: str) -> FileRow | None:
        row = self.conn.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", (path,)).fetchone()
        return FileRow(*row) if row else None

    def vector(self, model: ModelRow, file_id: int) -> np.ndarray | None:
        row = self.conn.execute(
            "SELECT vector FROM embeddings WHERE model_id = ? AND file_id = ?", (model.id, file_id)
        ).fetchone()
        return from_blobs([row[0]], model.dim)[0] if row else None

    def paths_of(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.conn.execute(f"SELECT id, path FROM files WHERE id IN ({marks})", chunk).fetchall())
        return out

    def live_vectors(self, model: ModelRow) -> tuple[np.ndarray, np.ndarray]:
        """(file ids, (N, D) float32) of every present file with a vector for ``model``, ordered by id."""
        rows = self.conn.execute(
            "SELECT e.file_id, e.vector FROM embeddings e JOIN files f ON f.id = e.file_id "
            "WHERE e.model_id = ? AND f.deleted_at IS NULL ORDER BY e.file_id",
            (model.id,),
        ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, from_blobs((r[1] for r in rows), model.dim)

    # -- which database this is; a file by id; how a folder is walked --------------------------------
    def side_file_key(self) -> tuple[int, int]:
        """(library id, generation), read in one statement: what a cached matrix of this database is valid for."""
        row = self.conn.execute(
            "SELECT (SELECT value FROM state WHERE key = 'library_id'), "
            "(SELECT value FROM state WHERE key = 'generation')"
        ).fetchone()
        return int(row[0]), int(row[1])

    def file_by_id(self, file_id: int) -> FileRow | None:
        row = self.conn.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return FileRow(*row) if row else None

    def follow_links(self, root: str) -> bool:
        row = self.conn.execute("SELECT follow_links FROM roots WHERE path = ?", (root,)).fetchone()
        return bool(row and row[0])


def now() -> float:
    return time.time()


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
