"""The library database: one SQLite file in WAL mode, a schema version and numbered migrations.

As in rclip's ``db.py`` and llm's ``embeddings_migrations.py``, the schema version lives in the file
(``PRAGMA user_version``) and every migration is a numbered step applied in its own transaction, so a
database written by any earlier clipworks opens and upgrades itself. Vectors are float32 BLOBs stored per
model; a ``generation`` counter goes up with every committed change so that readers in other threads or
processes know when their cached matrix is stale.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np

from clipworks.errors import ClipworksError, UsageError

BUSY_TIMEOUT_MS = 30_000
VECTOR_DTYPE = np.dtype("<f4")


# The columns of ``files`` a search filter reads into arrays (`metadata.FileFacets`): a change to them is
# logged like a change of vectors. Part of schema 7: another column is a new migration's trigger.
FACET_COLUMNS = ("taken_at", "taken_offset", "lat", "lon", "kind", "make", "model")


def _change_triggers() -> str:
    """Schema 7's triggers: each logs the file of a row a search reads (a vector, a file's presence or its
    filterable metadata) when it is written or removed. Part of a released migration: change them in a
    new one."""
    # Delete, then insert: an INSERT OR REPLACE in a trigger takes the conflict policy of the statement that
    # fired it, and under an outer INSERT OR IGNORE would keep the older generation.
    log = (
        "DELETE FROM changed_files WHERE file_id = {0}; INSERT INTO changed_files (file_id, generation) "
        "VALUES ({0}, (SELECT value FROM state WHERE key = 'generation'));"
    )
    triggers = [
        (f"{table}_{event.lower()}", event, table, [f"{row}.file_id" for row in rows], "")
        for table in ("embeddings", "moments")
        for event, rows in (("INSERT", ["NEW"]), ("UPDATE", ["OLD", "NEW"]), ("DELETE", ["OLD"]))
    ]
    facets = ", ".join(FACET_COLUMNS)
    triggers += [
        ("files_presence", "UPDATE OF deleted_at", "files", ["NEW.id"],
         "WHEN (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)"),
        ("files_facets", f"UPDATE OF {facets}", "files", ["NEW.id"],
         "WHEN " + " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in FACET_COLUMNS)),
        ("files_delete", "DELETE", "files", ["OLD.id"], ""),
    ]  # fmt: skip
    return "".join(
        f"CREATE TRIGGER {name}_logged AFTER {event} ON {table} {when} BEGIN "
        f"{' '.join(log.format(file_id) for file_id in file_ids)} END;\n"
        for name, event, table, file_ids, when in triggers
    )


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
    # 3: what each photo says about itself (`clipworks.library.metadata`): capture time as UTC seconds plus
    # the local offset, and whether EXIF or the file time gave it; position; camera; size; orientation;
    # a video's duration; photo or video. NULL ``taken_source`` means not read yet: the next index run
    # reads it. Search filters read these columns once per change into arrays (`metadata.Facets`), so they
    # need no index of their own; the folder filter uses the path's.
    """
    ALTER TABLE files ADD COLUMN taken_at REAL;
    ALTER TABLE files ADD COLUMN taken_offset INTEGER;
    ALTER TABLE files ADD COLUMN taken_source TEXT;
    ALTER TABLE files ADD COLUMN lat REAL;
    ALTER TABLE files ADD COLUMN lon REAL;
    ALTER TABLE files ADD COLUMN make TEXT;
    ALTER TABLE files ADD COLUMN model TEXT;
    ALTER TABLE files ADD COLUMN lens TEXT;
    ALTER TABLE files ADD COLUMN width INTEGER;
    ALTER TABLE files ADD COLUMN height INTEGER;
    ALTER TABLE files ADD COLUMN orientation INTEGER;
    ALTER TABLE files ADD COLUMN duration REAL;
    ALTER TABLE files ADD COLUMN kind TEXT NOT NULL DEFAULT 'photo';
    """,
    # 4: tags a model gave each photo (``interrogate --write-tags``) with their cosine; a search filter
    # (``--tag``) and XMP keywords read them. A photo's tags are replaced whole by each run that tags it.
    # Tags compare without regard to ASCII case, through the index.
    """
    CREATE TABLE tags (
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        score REAL NOT NULL,
        PRIMARY KEY (file_id, tag)
    ) WITHOUT ROWID;
    CREATE INDEX tags_tag ON tags(tag COLLATE NOCASE);
    """,
    # 5: videos. A video's vectors are its moments (`clipworks.video.frames.Moments`): one row per sampled
    # frame, numbered in time order, with its time in seconds. ``videos`` says which model sampled which
    # video and how often; a video's moments and that row are written in one transaction, so a video is
    # either sampled whole or not at all, and the row is what tells an index run it is done.
    """
    CREATE TABLE moments (
        model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        time REAL NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (model_id, file_id, ordinal)
    ) WITHOUT ROWID;
    CREATE INDEX moments_file ON moments(file_id);
    CREATE TABLE videos (
        model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        every_s REAL NOT NULL,
        moments INTEGER NOT NULL,
        PRIMARY KEY (model_id, file_id)
    ) WITHOUT ROWID;
    CREATE INDEX videos_file ON videos(file_id);
    """,
    # 6: what produced each model's vectors: the graph's precision and the decode mode (with its decoders),
    # each a "; "-joined list of every value an index run used, so a library indexed partly "exact" and
    # partly "fast" says so. NULL: vectors from before schema 6 or imported.
    """
    ALTER TABLE models ADD COLUMN precision TEXT;
    ALTER TABLE models ADD COLUMN decode TEXT;
    """,
    # 7: which files changed since a generation (`Store.files_changed_since`), so that a side file, an
    # approximate index or the search filters' arrays of 10M photos take in a change by reading the few
    # files it touched. One row per file: the generation its last change was made from (the counter goes
    # up at commit, so a change logged as g is in generation g + 1 on). Kept by triggers on everything a
    # search reads (a vector written or removed, a file gone or back, its filterable metadata), so no code
    # path that writes can forget it. It is complete from ``changes_from`` on: the generation this
    # migration ran at.
    """
    CREATE TABLE changed_files (file_id INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
    CREATE INDEX changed_files_generation ON changed_files(generation);
    INSERT INTO state (key, value) SELECT 'changes_from', value FROM state WHERE key = 'generation';
    """
    + _change_triggers(),
    # 8: a random stamp for each generation, so that a state cached beside the database (a side file, an
    # approximate index) is known to be of this database's history and not of one it was restored from a
    # backup over: a backup restored at generation 40 counts 41, 42... again, and a side file mapped at
    # 42 before the restore holds what the abandoned 42 held. Stamped by a trigger on the counter, so no
    # path that commits can skip it.
    """
    CREATE TABLE generations (generation INTEGER PRIMARY KEY, stamp INTEGER NOT NULL);
    INSERT INTO generations (generation, stamp) SELECT value, random() FROM state WHERE key = 'generation';
    CREATE TRIGGER generation_stamped AFTER UPDATE OF value ON state WHEN NEW.key = 'generation' BEGIN
        INSERT OR REPLACE INTO generations (generation, stamp) VALUES (NEW.value, random());
    END;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# The change log answers for a cache (a side file, an index, the filters' arrays) made at most this many
# commits ago; an older one reads everything again, as after any change to a tenth of the library. Without
# a bound the generations table grows by a row a commit (a tagging service commits per request) and the
# log keeps a row for every file ever changed. Forgotten every PRUNE_EVERY commits, in the commit itself.
CHANGE_LOG_COMMITS = 100_000
PRUNE_EVERY = 1024
CHECKED_TABLES = ("roots", "files", "models", "state")  # what a writer checks first (see `Store._check`)


class Revision(NamedTuple):
    """One committed state of one library database: what a matrix, an index or a filter's arrays cached
    from it are valid for. ``library_id`` tells it from another database made at the same path, ``stamp``
    from the same generation of a history since abandoned (schema 8)."""

    library_id: int
    generation: int
    stamp: int


@dataclass(frozen=True)
class ModelRow:
    id: int
    name: str
    fingerprint: str
    dim: int
    source: str | None
    precision: str | None = None  # every precision that produced vectors here, "; "-joined (schema 6)
    decode: str | None = None  # every decode mode (and its decoders) that did

    def produced_by(self) -> str:
        """``precision fp32, decode fast (JPEG simplejpeg, ...)``, or that it was not recorded."""
        if self.precision is None and self.decode is None:
            return "precision and decode not recorded"
        return f"precision {self.precision or 'not recorded'}, decode {self.decode or 'not recorded'}"


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

    @property
    def identified(self) -> bool:
        """Whether the row records enough of the file for `matches` to tell it from another."""
        return self.dev is not None

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` is this very file, unchanged: device and inode (a freed inode number is soon
        reused, so size and mtime too)."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (self.dev, self.ino, self.size, self.mtime_ns)


FILE_COLUMNS = "id, path, size, mtime_ns, hash, error, deleted_at, dev, ino, target"

# Search keys: the rows of the search index (`Store.live_vectors`), one integer each. A photo's key is its
# file id; a video moment's is negative and holds the video's file id and the moment's ordinal, so the file
# of any key is arithmetic (`files_of`) and a filter on files selects moments without a look-up.
MOMENT_SLOTS = 1 << 24  # moments per video a key can number: 93 days at one every 0.5 s


def moment_key(file_id: int, ordinal: int) -> int:
    return -(file_id * MOMENT_SLOTS + ordinal)


def files_of(keys: np.ndarray) -> np.ndarray:
    """The file id of each search key (a photo's own id, a moment's video)."""
    keys = np.asarray(keys, np.int64)
    return np.where(keys > 0, keys, -keys // MOMENT_SLOTS)


def rows_of_files(keys: np.ndarray, files: np.ndarray) -> np.ndarray:
    """The positions (ascending) in sorted search ``keys`` of every key of ``files``: a photo's own key and
    a video's moments. By binary search, not by ``files_of`` over every key: ``keys`` may be 10M long."""
    keys, files = np.asarray(keys, np.int64), np.unique(np.asarray(files, np.int64))
    if not len(keys) or not len(files):
        return np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(keys, files), len(keys) - 1)
    found = [at[keys[at] == files]]
    # A video's moments are the keys -(id * MOMENT_SLOTS + ordinal): one run of keys per video.
    first = np.searchsorted(keys, -(files * MOMENT_SLOTS + MOMENT_SLOTS - 1), "left")
    last = np.searchsorted(keys, -(files * MOMENT_SLOTS), "right")
    found += [np.arange(a, b) for a, b in zip(first.tolist(), last.tolist(), strict=True) if b > a]
    return np.unique(np.concatenate(found))


class Target(NamedTuple):
    """What a search key points at: a photo, or a moment ``time`` seconds into a video."""

    file_id: int
    path: str
    time: float | None


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


LIVE_BLOCK_ROWS = 65_536  # 128 MiB of 512-d BLOBs, and as much again as a matrix
# The rows of table {t} (moments m, embeddings e) that count for model ? : those of files still present.
_PRESENT_VECTORS = "JOIN files f ON f.id = {t}.file_id WHERE {t}.model_id = ? AND f.deleted_at IS NULL"


def from_blobs(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    data = b"".join(blobs)
    return np.frombuffer(data, dtype=VECTOR_DTYPE).reshape(-1, dim).astype(np.float32, copy=False)


def prefix_range(root: str) -> tuple[str, str]:
    """Bounds of every path strictly inside ``root`` for an index range scan (``/a/`` up to ``/a0``)."""
    root = root.rstrip(os.sep) or os.sep
    low = root if root.endswith(os.sep) else root + os.sep
    return low, low[:-1] + chr(ord(os.sep) + 1)


# Names are bound as their bytes (`to_bytes`) through this placeholder and stored as TEXT: SQLite keeps any
# bytes in a TEXT value and compares them bytewise, so valid UTF-8 reads as it always did and the prefix
# ranges still hold, while a name that is not UTF-8 (or an error message quoting one) round-trips exactly.
TEXT_ARG = "CAST(? AS TEXT)"


def to_bytes(text: str) -> bytes:
    """Text as stored: UTF-8, with the lone surrogates that stand for undecodable bytes (`os.fsdecode`)
    written back as those bytes. Fixed to UTF-8, so a library reads the same under any locale."""
    return text.encode("utf-8", "surrogateescape")


def from_bytes(data: bytes) -> str:
    """The inverse of `to_bytes`: the ``str`` Python's file functions take for those bytes."""
    return data.decode("utf-8", "surrogateescape")


ELSEWHERE = "make it writable or use --db elsewhere"
LOW_SPACE = 1 << 20


def read_only_uri(path: Path, *, immutable: bool = False) -> str:
    """A SQLite URI opening ``path`` (any bytes, percent-encoded) read-only."""
    return f"file:{quote(to_bytes(str(path.absolute())))}?mode=ro" + ("&immutable=1" if immutable else "")


def disk_fault(library: Path, error: sqlite3.Error) -> ClipworksError | None:
    """A one-line error for a fault of the library file or its disk, or None for any other SQLite error."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    if code == sqlite3.SQLITE_READONLY:
        return ClipworksError(f"{library} is read-only ({error}): {ELSEWHERE}")
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _out_of_space(library.parent)):
        return ClipworksError(
            f"the disk holding {library} is full ({error}): free some space and run again; "
            "what was stored before is intact"
        )
    if code == sqlite3.SQLITE_CORRUPT:
        return damaged(library, str(error))
    if code == sqlite3.SQLITE_IOERR:
        return ClipworksError(f"cannot read or write {library} ({error}): check its disk and run again")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ClipworksError(
            f"{library} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s: run again when it is done"
        )
    return None


def damaged(library: Path, detail: str) -> ClipworksError:
    return ClipworksError(
        f"{library} is damaged ({detail}): restore it from a backup, or move it aside and index again "
        f"(`sqlite3 {library} .recover` saves what is still readable)"
    )


def _out_of_space(folder: Path) -> bool:
    """Whether the disk is (all but) full: SQLite reports a full disk as an I/O error when it meets it while
    sizing the -shm file rather than writing a page."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < LOW_SPACE


def _explained(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: _Cursor, *args: Any) -> Any:
        try:
            return method(self, *args)
        except sqlite3.DatabaseError as e:
            fault = disk_fault(self.connection.library, e)
            if fault is None:
                raise
            raise fault from e

    return functools.wraps(method)(call)


class _Cursor(sqlite3.Cursor):
    """Turns disk faults met by any statement (a write, a commit, a row read late) into `disk_fault` errors."""

    connection: _Connection
    execute = _explained(sqlite3.Cursor.execute)
    executemany = _explained(sqlite3.Cursor.executemany)
    fetchone = _explained(sqlite3.Cursor.fetchone)
    fetchmany = _explained(sqlite3.Cursor.fetchmany)
    fetchall = _explained(sqlite3.Cursor.fetchall)
    __next__ = _explained(sqlite3.Cursor.__next__)


class _Connection(sqlite3.Connection):
    """A connection whose every cursor is a `_Cursor` naming ``library`` in its errors."""

    library: Path

    def cursor(self, factory: Any = None) -> _Cursor:  # type: ignore[override]
        return super().cursor(factory or _Cursor)  # type: ignore[no-any-return]

    # The C implementations of these make a plain cursor; route them through ours.
    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:  # type: ignore[override]
        return self.cursor().execute(sql, parameters)  # type: ignore[no-any-return]

    def executemany(self, sql: str, parameters: Any, /) -> _Cursor:  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)  # type: ignore[no-any-return]


class Store:
    """One connection to the library file. Not shared between threads: open one per thread.

    ``create`` opens for writing (creating the file when missing). A reader (``create=False``) of a file
    it may not write, or in a folder it may not write (a read-only mount), opens it read-only instead.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            if not create:
                raise UsageError(f"no library at {self.path}: run `clipworks index add DIR` first (or pass --db)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ClipworksError(f"cannot create the folder {self.path.parent} ({e.strerror}): {ELSEWHERE}") from e
        # WAL writes -wal and -shm files beside the database, so its folder must be writable too.
        writable = os.access(self.path.parent, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))
        if create and not writable:
            raise ClipworksError(f"{self.path} is read-only: {ELSEWHERE}")
        self.read_only = not writable
        try:
            self.conn = self._connect()
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self.read_only:
                self.conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives any crash of the process; only a power cut may drop the last commits.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            if create:
                self._check()
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ClipworksError(f"{self.path} is not a usable clipworks library ({e}); pass another --db") from e

    def _connect(self) -> sqlite3.Connection:
        target: str | Path = self.path
        if self.read_only:
            # A WAL database needs its -shm beside it; where none can be created and no -wal holds commits
            # the main file lacks, `immutable` reads the file alone (nobody can write it there anyway).
            wal = self.path.with_name(self.path.name + "-wal")
            unchanging = not os.access(self.path.parent, os.W_OK) and not wal.exists()
            target = read_only_uri(self.path, immutable=unchanging)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in `write()`.
        conn = sqlite3.connect(
            target, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
            uri=self.read_only, factory=_Connection,
        )  # fmt: skip
        conn.library = self.path
        conn.text_factory = from_bytes  # names that are not UTF-8 are stored as their bytes (see `TEXT_ARG`)
        return conn

    # -- schema ------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _check(self) -> None:
        """Refuse to write into a damaged file: SQLite only notices damage in the pages a statement reads,
        and an index run rewrites file rows it never reads back. The tables of folders and files are checked
        whole (a quarter second for 100k files); the vectors, most of the file, only where they are read."""
        marks = ",".join("?" * len(CHECKED_TABLES))
        present = self.conn.execute(f"SELECT name FROM sqlite_schema WHERE name IN ({marks})", CHECKED_TABLES)
        for (table,) in present.fetchall():  # none yet in a new file
            found = self.conn.execute(f"PRAGMA quick_check({table})").fetchone()[0]
            if found != "ok":
                raise damaged(self.path, found.splitlines()[-1])  # the first problem, without "*** in main"

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
            if self.read_only:
                raise ClipworksError(
                    f"{self.path} has schema version {version}, older than this clipworks ({SCHEMA_VERSION}), and is "
                    "read-only: open it once where it is writable to upgrade it"
                )
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
            # Read back, not RETURNING: that needs SQLite 3.35, newer than some systems' Python links.
            (generation,) = self.conn.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()
            if generation % PRUNE_EVERY == 0 and generation > CHANGE_LOG_COMMITS:
                self._forget_changes_before(generation - CHANGE_LOG_COMMITS)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _forget_changes_before(self, oldest: int) -> None:
        """The log from ``oldest`` on only: ``files_changed_since`` an older revision answers None (read
        everything), and the rows and stamps only such a revision would have needed are deleted."""
        self.conn.execute("UPDATE state SET value = ? WHERE key = 'changes_from' AND value < ?", (oldest, oldest))
        self.conn.execute("DELETE FROM changed_files WHERE generation < ?", (oldest,))
        self.conn.execute("DELETE FROM generations WHERE generation < ?", (oldest,))

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
    _MODEL_COLUMNS = "id, name, fingerprint, dim, source, precision, decode"

    def models(self) -> list[ModelRow]:
        rows = self.conn.execute(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY id").fetchall()
        return [ModelRow(*r) for r in rows]

    def find_model(self, name: str, fingerprint: str) -> ModelRow | None:
        row = self.conn.execute(
            f"SELECT {self._MODEL_COLUMNS} FROM models WHERE name = ? AND fingerprint = ?",
            (name, fingerprint),
        ).fetchone()
        return ModelRow(*row) if row else None

    def record_production(self, model_id: int, precision: str, decode: str) -> None:
        """Add ``precision`` and ``decode`` to what the model's vectors were made with (kept once each)."""
        with self.write() as db:
            row = db.execute("SELECT precision, decode FROM models WHERE id = ?", (model_id,)).fetchone()
            merged = [_add_to_list(old, new) for old, new in zip(row, (precision, decode), strict=True)]
            db.execute("UPDATE models SET precision = ?, decode = ? WHERE id = ?", (*merged, model_id))

    def ensure_model(self, name: str, fingerprint: str, dim: int, source: str | None) -> ModelRow:
        found = self.find_model(name, fingerprint)
        if found:
            if found.dim != dim:
                raise ClipworksError(f"{self.path} holds {found.dim}-d vectors for {name} but the model makes {dim}-d")
            return found
        with self.write() as db:
            db.execute(
                f"INSERT OR IGNORE INTO models (name, fingerprint, dim, source) VALUES (?, ?, ?, {TEXT_ARG})",
                (name, fingerprint, dim, None if source is None else to_bytes(source)),
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
            f"SELECT {FILE_COLUMNS} FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG}",
            (to_bytes(low), to_bytes(high)),
        ).fetchall()
        return [FileRow(*r) for r in rows]

    def file_by_path(self, path: str) -> FileRow | None:
        sql = f"SELECT {FILE_COLUMNS} FROM files WHERE path = {TEXT_ARG}"
        row = self.conn.execute(sql, (to_bytes(path),)).fetchone()
        return FileRow(*row) if row else None

    def vector(self, model: ModelRow, file_id: int) -> np.ndarray | None:
        row = self.conn.execute(
            "SELECT vector FROM embeddings WHERE model_id = ? AND file_id = ?", (model.id, file_id)
        ).fetchone()
        return self._matrix(model, [row[0]])[0] if row else None

    def paths_of(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.conn.execute(f"SELECT id, path FROM files WHERE id IN ({marks})", chunk).fetchall())
        return out

    def targets(self, model: ModelRow, keys: Iterable[int]) -> dict[int, Target]:
        """Search key -> its photo or video moment (keys whose file or moment is gone are left out)."""
        keys = [int(k) for k in keys]
        names = self.paths_of(files_of(np.asarray(keys, np.int64)).tolist() if keys else [])
        out: dict[int, Target] = {}
        for key in keys:
            if key > 0:
                if key in names:
                    out[key] = Target(key, names[key], None)
                continue
            file_id, ordinal = divmod(-key, MOMENT_SLOTS)
            row = self.conn.execute(
                "SELECT time FROM moments WHERE model_id = ? AND file_id = ? AND ordinal = ?",
                (model.id, file_id, ordinal),
            ).fetchone()
            if row is not None and file_id in names:
                out[key] = Target(file_id, names[file_id], float(row[0]))
        return out

    def metadata_of(self, file_ids: Sequence[int]) -> dict[int, Any]:
        """File id -> stored `metadata.Metadata`, for the ids whose metadata an index run read."""
        from clipworks.library.metadata import metadata_of  # metadata builds on this module

        return metadata_of(self.conn, file_ids)

    def live_vectors(self, model: ModelRow, files: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(search keys, (N, D) float32) of every present photo and video moment with a vector for
        ``model`` (of ``files`` only, when given), ordered by key: the moments first, then the photos by
        file id."""
        blocks = list(self.live_vector_blocks(model, files))
        if not blocks:
            return np.zeros(0, np.int64), np.zeros((0, model.dim), np.float32)
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])

    def live_vector_blocks(
        self, model: ModelRow, files: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``live_vectors`` a block of ``LIVE_BLOCK_ROWS`` at a time, in the same order: 10M 512-d vectors are
        20 GB, which neither their BLOBs nor the matrix built from them may take in memory at once. Call it
        inside ``snapshot`` where the blocks must be of one state."""
        chosen, parameters = "", [model.id]
        if files is not None:  # one parameter whatever the count (SQLite allows 32,766 of them)
            chosen = " AND f.id IN (SELECT value FROM json_each(?))"
            parameters.append(json.dumps(np.asarray(files, np.int64).tolist()))
        # Moments' keys are negative and file ids positive: the moments, then the photos in the embeddings'
        # own key order (no sort of 20 GB of BLOBs), is the order of all keys.
        queries = (
            f"SELECT -(m.file_id * {MOMENT_SLOTS} + m.ordinal), m.vector FROM moments m "
            f"{_PRESENT_VECTORS.format(t='m')}{chosen} ORDER BY 1",
            f"SELECT e.file_id, e.vector FROM embeddings e {_PRESENT_VECTORS.format(t='e')}{chosen} ORDER BY e.file_id",
        )
        for sql in queries:
            cursor = self.conn.execute(sql, parameters)
            while found := cursor.fetchmany(LIVE_BLOCK_ROWS):
                keys = np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found))
                yield keys, self._matrix(model, [r[1] for r in found])

    def files_changed_since(self, since: Revision, most: int) -> np.ndarray | None:
        """The ids (ascending) of the files whose vectors, presence or filtered metadata changed after
        ``since``: what a side file or index of that revision must read again. None where there are more
        than ``most`` (reading everything is then as quick), where the log (from schema 7) does not reach
        back that far, or where ``since`` is not of this database's history (another library's, or one this
        database was restored from a backup over): the caller reads everything."""
        row = self.conn.execute(
            "SELECT (SELECT value FROM state WHERE key = 'library_id'), "
            "(SELECT value FROM state WHERE key = 'changes_from'), "
            "(SELECT stamp FROM generations WHERE generation = ?)",
            (since.generation,),
        ).fetchone()
        if row[1] is None or since.generation < int(row[1]) or (row[0], row[2]) != (since.library_id, since.stamp):
            return None
        found = self.conn.execute(
            "SELECT file_id FROM changed_files WHERE generation >= ? LIMIT ?", (since.generation, most + 1)
        ).fetchall()
        if len(found) > most:
            return None
        return np.unique(np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found)))

    def live_vector_count(self, model: ModelRow) -> int:
        """How many rows ``live_vectors`` has."""
        return int(
            self.conn.execute(
                f"SELECT (SELECT count(*) FROM moments m {_PRESENT_VECTORS.format(t='m')}) "
                f"+ (SELECT count(*) FROM embeddings e {_PRESENT_VECTORS.format(t='e')})",
                (model.id, model.id),
            ).fetchone()[0]
        )

    def _matrix(self, model: ModelRow, blobs: list[bytes]) -> np.ndarray:
        """The vectors as rows, refusing any whose length is not the model's dimension (read as is, one
        such BLOB would shift every row after it)."""
        width = model.dim * VECTOR_DTYPE.itemsize
        wrong = sum(len(b) != width for b in blobs)
        if wrong:
            raise damaged(self.path, f"{wrong} of its vectors for {model.name} are not {model.dim}-d")
        return from_blobs(blobs, model.dim)

    # -- which database this is; a file by id; how a folder is walked --------------------------------
    def revision(self) -> Revision:
        """The committed state read now, in one statement: what a cached matrix of this database is valid for."""
        row = self.conn.execute(
            "SELECT (SELECT value FROM state WHERE key = 'library_id'), g.generation, g.stamp FROM generations g "
            "WHERE g.generation = (SELECT value FROM state WHERE key = 'generation')"
        ).fetchone()
        return Revision(int(row[0]), int(row[1]), int(row[2]))

    def file_by_id(self, file_id: int) -> FileRow | None:
        row = self.conn.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return FileRow(*row) if row else None

    # -- tags --------------------------------------------------------------------------------------
    def replace_tags(self, tags: Mapping[int, Sequence[tuple[str, float]]]) -> None:
        """Give each file id its (tag, score) list in place of the tags it had, in one transaction."""
        with self.write() as db:
            db.executemany("DELETE FROM tags WHERE file_id = ?", [(i,) for i in tags])
            db.executemany(
                "INSERT OR REPLACE INTO tags (file_id, tag, score) VALUES (?, ?, ?)",
                [(i, tag, float(score)) for i, pairs in tags.items() for tag, score in pairs],
            )

    def tags_of(self, ids: Iterable[int]) -> dict[int, list[tuple[str, float]]]:
        """File id -> its (tag, score) pairs, best first; ids without tags are left out."""
        ids = [int(i) for i in ids]
        out: dict[int, list[tuple[str, float]]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT file_id, tag, score FROM tags WHERE file_id IN ({marks}) ORDER BY file_id, score DESC, tag",
                chunk,
            )
            for file_id, tag, score in rows:
                out.setdefault(file_id, []).append((tag, score))
        return out

    def ids_tagged(self, tag: str) -> list[int]:
        """The present files tagged ``tag`` (ASCII case aside)."""
        rows = self.conn.execute(
            "SELECT t.file_id FROM tags t JOIN files f ON f.id = t.file_id "
            "WHERE t.tag = ? COLLATE NOCASE AND f.deleted_at IS NULL",
            (tag,),
        )
        return [i for (i,) in rows]

    def tagged_files(self) -> list[tuple[str, list[tuple[str, float]]]]:
        """(path, its tags best first) of every present file with tags, in path order."""
        rows = self.conn.execute(
            "SELECT f.id, f.path FROM files f WHERE f.deleted_at IS NULL "
            "AND EXISTS (SELECT 1 FROM tags t WHERE t.file_id = f.id) ORDER BY f.path"
        ).fetchall()
        tags = self.tags_of(i for i, _ in rows)
        return [(path, tags[i]) for i, path in rows]

    def follow_links(self, root: str) -> bool:
        row = self.conn.execute(f"SELECT follow_links FROM roots WHERE path = {TEXT_ARG}", (to_bytes(root),)).fetchone()
        return bool(row and row[0])


def now() -> float:
    return time.time()


def _statements(script: str) -> list[str]:
    """The statements of ``script``, split at the semicolons that end one (not those inside a trigger)."""
    statements, part = [], ""
    for piece in script.split(";"):
        part += piece + ";"
        if sqlite3.complete_statement(part):
            if part.strip(" \n;"):
                statements.append(part.strip())
            part = ""
    return statements


def _add_to_list(joined: str | None, value: str) -> str:
    values = joined.split("; ") if joined else []
    return "; ".join(values if value in values else [*values, value])
