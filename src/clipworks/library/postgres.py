"""A shared library in Postgres with pgvector: several indexers push into it, several servers search it.

``--store postgres://...`` names it. Each indexer keeps its own SQLite library (``--db``, where `indexer`
embeds and tracks files) and `PostgresStore.push` copies what changed into Postgres: files with the metadata
columns the search filters read, each model's vectors in a ``vector(dim)`` table with an HNSW index (inner
product on unit vectors: the cosine), and tags. Searches run in SQL: the filters choose the rows and pgvector
ranks them (`PostgresStore.ranked`), so a filter is never applied to the top hits after ranking.

Pushes are incremental and idempotent: a digest per (model, file) of everything pushed for it says whether
there is anything to send, and every write is an upsert keyed by the file's path, so two indexers pushing the
same photos at once neither duplicate nor lose a row. Files a push does not know of stay: another indexer may
have pushed them.

Postgres text cannot hold every file name (bytes that are not UTF-8, NUL), so paths are ``bytea`` holding the
bytes SQLite holds (`store.to_bytes`); a prefix range over them is then the folder filter, as in SQLite.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from clipworks.errors import ClipworksError, UsageError
from clipworks.library import LibraryBase
from clipworks.library.metadata import METADATA_COLUMNS, Filters, bounding_box
from clipworks.library.search import ExactIndex
from clipworks.library.store import MOMENT_SLOTS, FileRow, ModelRow, Store, Target, from_bytes, moment_key, to_bytes

if TYPE_CHECKING:
    from clipworks.library.metadata import Metadata

INSTALL_HINT = "pip install 'clipworks[postgres]'"
URL_SCHEMES = ("postgres", "postgresql")
SCHEMA_VERSION = 2  # 2: files.target and the roots table, for the gallery
# Held while creating tables and indexes: two first pushes at once would otherwise race on CREATE ... IF NOT
# EXISTS (it is not atomic in Postgres). Any constant that no other application uses.
SCHEMA_LOCK = 0x636C6970  # "clip"
PUSH_CHUNK = 2_000  # SQLite files per Postgres transaction
BULK_ROWS = 10_000  # a push adding at least this many vectors (and most of the table) builds HNSW once
# The HNSW candidate list (hnsw.ef_search; pgvector's default is 40) and the graph's links per node and build
# beam (pgvector's defaults: 16 and 64). Measured on clustered 512-d vectors with queries as far from the photos
# as a text prompt lies (bench_postgres.py, RESULTS.md): pgvector's default graph recalls 0.959 of the exact top
# 10 at ef_search 400 on 100,000 vectors but only 0.453 on 1,000,000; m 32 and ef_construction 128 (what the
# SQLite library's faiss graph uses) recall 1.000 at 400 on 100,000 and 0.973 on 300,000, for a build 4 to 5
# times slower. On 1,000,000 that graph still recalls only 0.708 at 400 (17.9 ms p50) and 0.858 at 1000
# (39.6 ms): from WIDE_BEAM_ROWS vectors on, searches walk the widest list pgvector allows.
# pgvector allows ef_search up to 1000: a deeper page than that is ranked exactly.
EF_SEARCH_DEFAULT, EF_SEARCH_MAX = 400, 1000
WIDE_BEAM_ROWS = 500_000
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 128
CONNECT_TIMEOUT_S = 10
RETRIES = 5  # a deadlock or serialization failure between concurrent pushers is retried, not reported

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS state (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id serial PRIMARY KEY,
    name text NOT NULL,
    fingerprint text NOT NULL,
    dim integer NOT NULL,
    source text,
    precision text,
    decode text,
    UNIQUE (name, fingerprint)
);
CREATE TABLE IF NOT EXISTS files (
    id bigserial PRIMARY KEY,
    path bytea NOT NULL UNIQUE,
    size bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    hash text,
    deleted_at double precision,
    taken_at double precision,
    taken_offset integer,
    taken_source text,
    lat double precision,
    lon double precision,
    make text,
    model text,
    lens text,
    width integer,
    height integer,
    orientation integer,
    duration double precision,
    kind text NOT NULL DEFAULT 'photo'
);
ALTER TABLE files ADD COLUMN IF NOT EXISTS target bytea;
CREATE TABLE IF NOT EXISTS roots (path bytea PRIMARY KEY);
CREATE TABLE IF NOT EXISTS tags (
    file_id bigint NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    tag text NOT NULL,
    score real NOT NULL,
    PRIMARY KEY (file_id, tag)
);
CREATE INDEX IF NOT EXISTS tags_tag ON tags (lower(tag));
CREATE TABLE IF NOT EXISTS pushed (
    model_id integer NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    file_id bigint NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    digest bytea NOT NULL,
    PRIMARY KEY (model_id, file_id)
);
INSERT INTO state (key, value) VALUES ('schema_version', 2) ON CONFLICT (key) DO UPDATE
    SET value = greatest(state.value, EXCLUDED.value);
"""

# ``target``: the real path of a file indexed through a symlink (bytes, as ``path``).
FILE_FIELDS = ("path", "size", "mtime_ns", "hash", "deleted_at", "target", *METADATA_COLUMNS)
BYTES_FIELDS = {"path", "target"}
TEXT_FIELDS = {"hash", "taken_source", "make", "model", "lens", "kind"}


def vectors_table(model_id: int) -> str:
    """One table per model: an HNSW index needs one fixed dimension. Keys are search keys (`store.moment_key`
    with this database's file ids), so results read as the SQLite library's."""
    return f"vectors_m{int(model_id)}"


def check_url(url: str) -> str:
    """``url`` if it names a Postgres database, else a one-line `UsageError` naming it."""
    scheme = urlsplit(url).scheme
    if scheme not in URL_SCHEMES:
        raise UsageError(
            f"store {redacted(url)!r} is not a Postgres URL: write postgres://USER@HOST:PORT/DATABASE "
            "(or postgresql://...)",
            setting="store",
        )
    return url


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _psycopg() -> Any:
    try:
        import pgvector.psycopg  # noqa: F401 -- imported here so a missing one gets the same hint
        import psycopg
    except ImportError as e:
        raise UsageError(f"a Postgres store needs psycopg and pgvector ({e.name} is missing): {INSTALL_HINT}") from e
    return psycopg


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _text(value: Any) -> Any:
    """Text as Postgres can hold it: bytes that are not UTF-8 replaced, NUL dropped (none of the filters
    compare such characters; paths, which must round-trip, are bytes instead)."""
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "")


@dataclass
class PushReport:
    files: int = 0  # files sent (new or changed since the last push)
    unchanged: int = 0  # files whose digest matched: nothing sent
    vectors: int = 0  # photo vectors and video moments sent
    tags: int = 0
    index_s: float = 0.0  # seconds spent building the HNSW index at the end (a push of mostly new rows)

    def summary(self) -> str:
        built = f"; HNSW index built in {self.index_s:.0f} s" if self.index_s else ""
        return (
            f"pushed {self.files} files ({self.vectors} vectors, {self.tags} tags), {self.unchanged} unchanged{built}"
        )


class PostgresStore:
    """One connection to a shared library in Postgres. Not shared between threads: open one per thread."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url)
        psycopg = _psycopg()
        # A server that drops packets would otherwise keep a command waiting for minutes.
        timeout = {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_S}
        try:
            self.conn = psycopg.connect(url, autocommit=True, **timeout)
        except psycopg.Error as e:
            raise ClipworksError(
                f"cannot open the library store {redacted(url)}: {_first_line(e)}", setting="store"
            ) from e
        try:
            self._ensure_schema()
        except psycopg.Error as e:
            self.conn.close()
            raise ClipworksError(
                f"{redacted(url)} cannot hold a clipworks library ({_first_line(e)}): it needs pgvector 0.5 or later "
                "installed on the server, and a user who may create tables",
                setting="store",
            ) from e
        from pgvector.psycopg import register_vector

        register_vector(self.conn)
        self.pgvector_version = self.conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in (s.strip() for s in SCHEMA.split(";")):
                if statement:
                    cur.execute(statement)
            version = cur.execute("SELECT value FROM state WHERE key = 'schema_version'").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ClipworksError(
                f"{redacted(self.url)} has store schema {version}, newer than this clipworks ({SCHEMA_VERSION}): "
                "upgrade clipworks"
            )

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A read transaction: every query inside sees the same committed state, whatever indexers push."""
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield self.conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed on success and rolled back on any error."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            yield cur

    def _retrying(self, work: Callable[[Any], Any]) -> Any:
        """``work(cursor)`` in a transaction, again when Postgres aborted it for a deadlock with another writer."""
        from psycopg import errors

        for attempt in range(RETRIES):
            try:
                with self.transaction() as cur:
                    return work(cur)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == RETRIES - 1:
                    raise
        return None

    # -- models --------------------------------------------------------------------------------------
    _MODEL_COLUMNS = "id, name, fingerprint, dim, source, precision, decode"

    def models(self) -> list[ModelRow]:
        rows = self.conn.execute(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY id").fetchall()
        return [ModelRow(*r) for r in rows]

    def find_model(self, name: str, fingerprint: str) -> ModelRow | None:
        row = self.conn.execute(
            f"SELECT {self._MODEL_COLUMNS} FROM models WHERE name = %s AND fingerprint = %s", (name, fingerprint)
        ).fetchone()
        return ModelRow(*row) if row else None

    def ensure_model(self, model: ModelRow) -> ModelRow:
        """This store's row for ``model`` (a SQLite library's), with its vectors table and HNSW index."""

        def work(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cur.execute(
                "INSERT INTO models (name, fingerprint, dim, source, precision, decode) VALUES (%s, %s, %s, %s, %s, "
                "%s) ON CONFLICT (name, fingerprint) DO UPDATE SET source = coalesce(models.source, EXCLUDED.source), "
                "precision = coalesce(EXCLUDED.precision, models.precision), "
                "decode = coalesce(EXCLUDED.decode, models.decode)",
                (model.name, model.fingerprint, model.dim, _text(model.source), model.precision, model.decode),
            )
            found = cur.execute(
                "SELECT id, dim FROM models WHERE name = %s AND fingerprint = %s", (model.name, model.fingerprint)
            ).fetchone()
            if found[1] != model.dim:
                raise ClipworksError(
                    f"{redacted(self.url)} holds {found[1]}-d vectors for {model.name} but the library has "
                    f"{model.dim}-d ones"
                )
            table = vectors_table(found[0])
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (key bigint PRIMARY KEY, "
                "file_id bigint NOT NULL REFERENCES files(id) ON DELETE CASCADE, time double precision, "
                f"embedding vector({int(model.dim)}) NOT NULL)"
            )
            cur.execute(f"CREATE INDEX IF NOT EXISTS {table}_file ON {table} (file_id)")
            _create_hnsw(cur, table)

        self._retrying(work)
        found = self.find_model(model.name, model.fingerprint)
        assert found is not None
        return found

    # -- pushing a SQLite library --------------------------------------------------------------------
    def push(self, source: Store, model: ModelRow, on_chunk: Callable[[int], None] = lambda _n: None) -> PushReport:
        """Copy ``source``'s files, ``model``'s vectors and the tags into this store, what changed only."""
        target = self.ensure_model(model)
        table = vectors_table(target.id)
        report = PushReport()
        digests = {
            bytes(path): bytes(digest)
            for path, digest in self.conn.execute(
                "SELECT f.path, p.digest FROM pushed p JOIN files f ON f.id = p.file_id WHERE p.model_id = %s",
                (target.id,),
            )
        }
        # Rows added one at a time to an HNSW graph cost pgvector far more than one build of the graph over
        # them (a push of 10,000 512-d vectors: 75 rows/s into the index, 1,000 rows/s loading then building;
        # RESULTS.md): a push that mostly adds rows drops the index and builds it once at the end. Searches
        # meanwhile scan every row (right, only slower); a pusher that starts meanwhile builds it again first
        # and then adds its rows to it, also right.
        arriving = sum(source.conn.execute(
            "SELECT (SELECT count(*) FROM embeddings WHERE model_id = ?1) + "
            "(SELECT count(*) FROM moments WHERE model_id = ?1)", (model.id,)
        ).fetchone())  # fmt: skip
        present = self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        rebuild = arriving - present >= BULK_ROWS and arriving > 2 * present
        if rebuild:
            self.conn.execute(f"DROP INDEX IF EXISTS {table}_hnsw")
        try:
            self._push_chunks(source, model, target.id, table, digests, report, on_chunk)
        finally:
            if rebuild:
                start = time.perf_counter()
                self._retrying(lambda cur: _create_hnsw(cur, table))
                report.index_s = time.perf_counter() - start
        return report

    def _push_chunks(
        self,
        source: Store,
        model: ModelRow,
        model_id: int,
        table: str,
        digests: dict[bytes, bytes],
        report: PushReport,
        on_chunk: Callable[[int], None],
    ) -> None:
        last = 0
        while True:
            with source.snapshot() as db:
                chunk = _read_chunk(db, model, last, PUSH_CHUNK)
            if not chunk:
                return
            last = chunk[-1].source_id
            changed = [f for f in chunk if digests.get(f.path) != f.digest]
            report.unchanged += len(chunk) - len(changed)
            if changed:
                self._retrying(lambda cur, changed=changed: self._write_chunk(cur, model_id, table, changed))
                report.files += len(changed)
                report.vectors += sum(len(f.vectors) for f in changed if f.deleted_at is None)
                report.tags += sum(len(f.tags) for f in changed)
            on_chunk(report.files + report.unchanged)

    def _write_chunk(self, cur: Any, model_id: int, table: str, chunk: list[_SourceFile]) -> None:
        # Sorted by path, so concurrent pushers lock the rows they share in one order (no deadlock between them).
        chunk = sorted(chunk, key=lambda f: f.path)
        columns = ", ".join(FILE_FIELDS)
        marks = ", ".join(["%s"] * len(FILE_FIELDS))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in FILE_FIELDS[1:])
        ids: dict[bytes, int] = {}
        for f in chunk:
            row = cur.execute(
                f"INSERT INTO files ({columns}) VALUES ({marks}) ON CONFLICT (path) DO UPDATE SET {updates} "
                "RETURNING id",
                f.row(),
            ).fetchone()
            ids[f.path] = row[0]
        file_ids = list(ids.values())
        cur.execute("DELETE FROM tags WHERE file_id = ANY(%s)", (file_ids,))
        cur.executemany(
            "INSERT INTO tags (file_id, tag, score) VALUES (%s, %s, %s) ON CONFLICT (file_id, tag) "
            "DO UPDATE SET score = EXCLUDED.score",
            [(ids[f.path], _text(tag), score) for f in chunk for tag, score in f.tags],
        )
        # Vectors of a deleted file leave Postgres (SQLite keeps them in case it comes back; a push then sends
        # them again): unfiltered searches need no join to skip the deleted.
        cur.execute(f"DELETE FROM {table} WHERE file_id = ANY(%s)", (file_ids,))
        with cur.copy(f"COPY {table} (key, file_id, time, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int8", "float8", "vector"])
            for f in chunk:
                if f.deleted_at is not None:
                    continue
                file_id = ids[f.path]
                for ordinal, at, vector in f.vectors:
                    key = file_id if ordinal is None else moment_key(file_id, ordinal)
                    copy.write_row((key, file_id, at, vector))
        cur.executemany(
            "INSERT INTO pushed (model_id, file_id, digest) VALUES (%s, %s, %s) ON CONFLICT (model_id, file_id) "
            "DO UPDATE SET digest = EXCLUDED.digest",
            [(model_id, ids[f.path], f.digest) for f in chunk],
        )

    # -- search ---------------------------------------------------------------------------------------
    def ranked(
        self,
        model: ModelRow,
        vector: np.ndarray,
        *,
        top_k: int = 10,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        filters: Filters | None = None,
        offset: int = 0,
        exact: bool = False,
        ef_search: int | None = None,
    ) -> list[tuple[int, float]]:
        """(search key, cosine) ranked ``offset`` to ``offset + top_k`` among the rows ``filters`` let through,
        best first (ties by key, as the SQLite library orders them).

        The HNSW index answers unless ``exact``, walking ``ef_search`` candidates (more: better recall, slower;
        None: ``default_ef_search``);
        a filtered search that the index cannot fill (pgvector before
        0.8 filters the index's candidates after the scan) is ranked again exactly over the filtered rows, so
        a filter never thins out the page."""
        wanted = offset + top_k
        ef_search = self.default_ef_search(model) if ef_search is None else ef_search
        where, args = filter_sql(filters) if filters else ("", [])
        if exclude:
            where += " AND v.key <> ALL(%s)"
            args.append([int(k) for k in exclude])
        join = " JOIN files f ON f.id = v.file_id" if filters else ""
        query = np.asarray(vector, np.float32)
        # The rows the filters let through, scored (the query, then the filters' arguments).
        scored = f"SELECT v.key, -(v.embedding <#> %s) FROM {vectors_table(model.id)} v{join} WHERE true{where} "
        sql = scored + "ORDER BY v.embedding <#> %s LIMIT %s"
        # One row past the page: where it ties with the page's last, the tie is settled by key below.
        params = [query, *args, query, wanted + 1]
        use_index = not exact and wanted + 1 <= EF_SEARCH_MAX
        # pgvector before 0.8 filters the index's ef_search candidates after the scan: a filter passing a tenth
        # of the photos leaves a tenth of them, so filtered searches take the widest candidate list there.
        narrowed = (filters or exclude) and _version(self.pgvector_version) < (0, 8)
        # pgvector before 0.8 returns at most ef_search rows: the row past the page needs one more.
        beam = EF_SEARCH_MAX if narrowed else min(EF_SEARCH_MAX, max(ef_search, wanted + 1))
        rows = self._rank(sql, params, use_index, beam)
        if use_index and len(rows) <= wanted and (filters or exclude):
            rows = self._rank(sql, params, False, beam)
        rows.sort(key=lambda r: (-r[1], r[0]))
        if len(rows) > wanted and rows[wanted - 1][1] == rows[wanted][1]:
            rows = self._settle_tie_at_the_cut(scored, [query, *args], query, rows, wanted)
        out = [(int(k), float(s)) for k, s in rows[offset:wanted]]
        return [hit for hit in out if threshold is None or hit[1] >= threshold]

    def _settle_tie_at_the_cut(self, scored: str, scored_args: list[Any], query: np.ndarray,
                               rows: list[tuple[int, float]], wanted: int) -> list[tuple[int, float]]:  # fmt: skip
        """``rows`` with the rows scoring as the page's last chosen by key among all that do, not by the order
        Postgres met them in (a photo and its copy, embedded in one batch, score alike to the last bit): so a
        page is always the start of the next one's ranking, and paging never repeats or skips a hit. Rare,
        and a sequential scan: equal distances have no index."""
        tie = rows[wanted - 1][1]
        above = [r for r in rows if r[1] > tie]
        sql = scored + "AND -(v.embedding <#> %s) = %s ORDER BY v.key LIMIT %s"
        tied = self._rank(sql, [*scored_args, query, tie, wanted - len(above)], False, 0)
        return above + tied

    def default_ef_search(self, model: ModelRow) -> int:
        """The candidate list for the model's table: EF_SEARCH_DEFAULT, or the widest from WIDE_BEAM_ROWS on
        (Postgres' row estimate, which ANALYZE, autovacuum and the index build keep). Read at every search:
        a catalog lookup costs about 0.1 ms against 8-40 ms for the walk, and a server running for days
        sees its library grow past the threshold."""
        estimate = self.conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", (vectors_table(model.id),)
        ).fetchone()
        rows = estimate[0] if estimate and estimate[0] is not None else 0
        return EF_SEARCH_MAX if rows >= WIDE_BEAM_ROWS else EF_SEARCH_DEFAULT

    def _rank(self, sql: str, params: list[Any], use_index: bool, beam: int) -> list[tuple[int, float]]:
        with self.transaction() as cur:
            if use_index:
                cur.execute(f"SET LOCAL hnsw.ef_search = {int(beam)}")
                if _version(self.pgvector_version) >= (0, 8):
                    # Keep scanning the graph until the filters let `wanted` rows through, in distance order.
                    cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            else:
                cur.execute("SET LOCAL enable_indexscan = off")  # a sequential scan: every row ranked
            return [(int(k), float(s)) for k, s in cur.execute(sql, params).fetchall()]

    def targets(self, model: ModelRow, keys: Sequence[int]) -> dict[int, Target]:
        """Search key -> what it points at (`store.Target`: this database's file id, path, a moment's time)."""
        rows = self.conn.execute(
            f"SELECT v.key, v.file_id, f.path, v.time FROM {vectors_table(model.id)} v "
            "JOIN files f ON f.id = v.file_id WHERE v.key = ANY(%s)",
            ([int(k) for k in keys],),
        ).fetchall()
        return {int(k): Target(int(i), from_bytes(bytes(p)), None if t is None else float(t)) for k, i, p, t in rows}

    def local_times(self, file_ids: Sequence[int]) -> dict[int, float | None]:
        """File id -> wall-clock capture time (`Metadata.local_time`)."""
        rows = self.conn.execute(
            "SELECT id, taken_at + coalesce(taken_offset, 0) FROM files WHERE id = ANY(%s)",
            ([int(i) for i in file_ids],),
        ).fetchall()
        return {int(i): t for i, t in rows}

    def tags_of(self, file_ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        out: dict[int, list[tuple[str, float]]] = {}
        rows = self.conn.execute(
            "SELECT file_id, tag, score FROM tags WHERE file_id = ANY(%s) ORDER BY file_id, score DESC, tag",
            ([int(i) for i in file_ids],),
        )
        for file_id, tag, score in rows:
            out.setdefault(int(file_id), []).append((tag, float(score)))
        return out

    # -- what the gallery reads -------------------------------------------------------------------------
    def file_by_id(self, file_id: int) -> SharedFileRow | None:
        row = self.conn.execute(f"SELECT {SHARED_FILE_COLUMNS} FROM files WHERE id = %s", (int(file_id),)).fetchone()
        return SharedFileRow.of(row) if row else None

    def file_by_path(self, path: str) -> SharedFileRow | None:
        sql = f"SELECT {SHARED_FILE_COLUMNS} FROM files WHERE path = %s"
        row = self.conn.execute(sql, (to_bytes(path),)).fetchone()
        return SharedFileRow.of(row) if row else None

    def vector(self, model: ModelRow, file_id: int) -> np.ndarray | None:
        """The vector of photo ``file_id`` (its search key is its id), None for a video or a file without one."""
        row = self.conn.execute(
            f"SELECT embedding FROM {vectors_table(model.id)} WHERE key = %s", (int(file_id),)
        ).fetchone()
        return None if row is None else np.asarray(row[0].to_numpy(), np.float32)

    def vectors_of(self, model: ModelRow, keys: Sequence[int]) -> np.ndarray:
        """The vectors of the search keys ``keys`` (all present), in their order."""
        keys = [int(k) for k in keys]
        rows = dict(
            self.conn.execute(
                f"SELECT key, embedding FROM {vectors_table(model.id)} WHERE key = ANY(%s)", (keys,)
            ).fetchall()
        )
        out = np.zeros((len(keys), model.dim), np.float32)
        for n, key in enumerate(keys):
            out[n] = rows[key].to_numpy()
        return out

    def live_vectors(self, model: ModelRow, photos_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(search keys ascending, their vectors) of ``model``: the video moments first (negative keys), then
        the photos by file id, as `Store.live_vectors` orders them; ``photos_only``: the moments left out."""
        ids, rows = [], []
        where = "WHERE key > 0 " if photos_only else ""
        # A server-side cursor (inside a transaction, as Postgres requires): the rows arrive in batches.
        with self.conn.transaction(), self.conn.cursor(name="live_vectors") as cur:
            cur.execute(f"SELECT key, embedding FROM {vectors_table(model.id)} {where}ORDER BY key")
            for key, embedding in cur:
                ids.append(key)
                rows.append(embedding.to_numpy())
        matrix = np.asarray(rows, np.float32).reshape(len(rows), model.dim)
        return np.asarray(ids, np.int64), matrix

    def key_counts(self, model: ModelRow) -> tuple[int, int]:
        """(photos, video moments) among ``model``'s vectors (moment keys are negative: `store.files_of`)."""
        photos, moments = self.conn.execute(
            f"SELECT count(*) FILTER (WHERE key > 0), count(*) FILTER (WHERE key < 0) FROM {vectors_table(model.id)}"
        ).fetchone()
        return int(photos), int(moments)

    def roots(self) -> list[str]:
        """Every folder any indexer pushed, in path order."""
        return [from_bytes(bytes(p)) for (p,) in self.conn.execute("SELECT path FROM roots ORDER BY path")]

    def push_roots(self, source: Store) -> None:
        """Add ``source``'s folders to the store's (a folder another indexer pushed stays)."""
        roots = sorted(to_bytes(root) for root, _ in source.roots())
        with self.transaction() as cur:
            cur.executemany("INSERT INTO roots (path) VALUES (%s) ON CONFLICT DO NOTHING", [(r,) for r in roots])

    def metadata_of(self, file_ids: Sequence[int]) -> dict[int, Metadata]:
        """File id -> stored metadata, for the ids whose metadata an index run read."""
        from clipworks.library.metadata import UNREAD, Metadata

        rows = self.conn.execute(
            f"SELECT id, {', '.join(METADATA_COLUMNS)} FROM files WHERE id = ANY(%s) AND NOT {UNREAD}",
            ([int(i) for i in file_ids],),
        )
        return {int(row[0]): Metadata(*row[1:]) for row in rows}

    def camera_counts(self) -> list[tuple[str, int]]:
        """("make model", present photos) of each camera, most photos first (as `metadata.camera_counts`)."""
        from clipworks.library.metadata import UNREAD

        camera = "trim(coalesce(make, '') || ' ' || coalesce(model, ''))"
        rows = self.conn.execute(
            f'SELECT camera, count(*) FROM (SELECT {camera} COLLATE "C" AS camera FROM files WHERE deleted_at IS NULL '
            f"AND NOT {UNREAD}) c WHERE camera <> '' GROUP BY camera ORDER BY 2 DESC, camera"  # byte order, as SQLite
        )
        return [(name, int(count)) for name, count in rows]

    def _timeline_sql(self, model: ModelRow, filters: Filters | None) -> tuple[str, list[Any]]:
        """One row per file that ``filters`` let through (a photo's key; a video's first moment, ordinal 0,
        whose key is the video's largest) with its wall-clock capture time as ``local``."""
        where, args = filter_sql(filters) if filters else ("", [])
        sql = (
            f"SELECT DISTINCT ON (v.file_id) v.key, v.file_id, f.taken_at + coalesce(f.taken_offset, 0) AS local "
            f"FROM {vectors_table(model.id)} v JOIN files f ON f.id = v.file_id WHERE true{where} "
            "ORDER BY v.file_id, v.key DESC"
        )
        return sql, args

    def recent(self, model: ModelRow, filters: Filters | None, top_k: int, offset: int) -> list[int]:
        """`Library.recent` in SQL: newest first by the wall clock, files of one time by id, unknown last."""
        sql, args = self._timeline_sql(model, filters)
        rows = self.conn.execute(
            f"SELECT key FROM ({sql}) t ORDER BY local IS NULL, local DESC, file_id LIMIT %s OFFSET %s",
            [*args, int(top_k), int(offset)],
        )
        return [int(k) for (k,) in rows]

    def month_counts(self, model: ModelRow, filters: Filters | None) -> list[tuple[str, int]]:
        """`Library.month_counts` in SQL: months of the wall-clock capture time, as UTC calendar months."""
        sql, args = self._timeline_sql(model, filters)
        rows = self.conn.execute(
            f"SELECT to_char(timezone('UTC', to_timestamp(local)), 'YYYY-MM') AS month, count(*) FROM ({sql}) t "
            "WHERE local IS NOT NULL GROUP BY month ORDER BY month DESC",
            args,
        )
        return [(month, int(count)) for month, count in rows]

    def counts(self, model: ModelRow) -> tuple[int, int]:
        """(present files, vectors of ``model``)."""
        files = self.conn.execute("SELECT count(*) FROM files WHERE deleted_at IS NULL").fetchone()[0]
        vectors = self.conn.execute(f"SELECT count(*) FROM {vectors_table(model.id)}").fetchone()[0]
        return int(files), int(vectors)

    def status(self) -> StoreStatus:
        files, deleted = self.conn.execute(
            "SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE deleted_at IS NOT NULL) "
            "FROM files"
        ).fetchone()
        models = []
        for row in self.models():
            vectors = self.counts(row)[1]
            hnsw = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{vectors_table(row.id)}_hnsw",))
            models.append((row, vectors, bool(hnsw.fetchone()[0])))
        return StoreStatus(redacted(self.url), self.pgvector_version, int(files), int(deleted), models)


SHARED_FILE_COLUMNS = "id, path, size, mtime_ns, hash, deleted_at, target"


@dataclass(frozen=True)
class SharedFileRow(FileRow):
    """A file row of the shared store. It is served by machines other than the indexer's, where the
    device and inode numbers of the same file differ (a network mount): the file is told by its size and
    nanosecond mtime instead, which any change to it moves."""

    @classmethod
    def of(cls, row: Sequence[Any]) -> SharedFileRow:
        file_id, path, size, mtime_ns, digest, deleted_at, target = row
        return cls(int(file_id), from_bytes(bytes(path)), int(size), int(mtime_ns), digest, None, deleted_at, None,
                   None, None if target is None else from_bytes(bytes(target)))  # fmt: skip

    @property
    def identified(self) -> bool:
        return True

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


@dataclass
class StoreStatus:
    url: str  # without its password
    pgvector: str
    files: int
    deleted: int
    models: list[tuple[ModelRow, int, bool]]  # (model, vectors, whether its HNSW index is there)


def _create_hnsw(cur: Any, table: str) -> None:
    """The HNSW index of a vectors table, unless it has one; under the schema lock, since two pushers
    creating it at once would collide on its name."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    # Inner product on unit vectors is the cosine, and cheaper than pgvector's cosine distance.
    cur.execute(
        f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw (embedding vector_ip_ops) "
        f"WITH (m = {int(HNSW_M)}, ef_construction = {int(HNSW_EF_CONSTRUCTION)})"
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def filter_sql(filters: Filters) -> tuple[str, list[Any]]:
    """`Filters` as SQL conditions on ``files f`` (`` AND ...``) and their arguments: the same rows
    `Filters.rows` lets through in the SQLite library."""
    where: list[str] = []
    args: list[Any] = []
    local = "(f.taken_at + coalesce(f.taken_offset, 0))"
    for bound, op in ((filters.after, ">="), (filters.before, "<=")):
        if bound is not None:  # an unknown time is NULL: it compares to nothing, so such a photo never matches
            where.append(f"{'f.taken_at' if bound.utc else local} {op} %s")
            args.append(bound.seconds)
    if filters.camera is not None:
        where.append("strpos(lower(trim(coalesce(f.make, '') || ' ' || coalesce(f.model, ''))), %s) > 0")
        args.append(filters.camera.lower())
    if filters.kind is not None:
        where.append("f.kind = %s")
        args.append(filters.kind)
    if filters.folder is not None:
        from clipworks.library.store import prefix_range

        low, high = prefix_range(filters.folder)
        where.append("f.path >= %s AND f.path < %s")
        args += [to_bytes(low), to_bytes(high)]
    if filters.tag is not None:
        where.append("EXISTS (SELECT 1 FROM tags t WHERE t.file_id = f.id AND lower(t.tag) = lower(%s))")
        args.append(filters.tag)
    if filters.near is not None:
        near = filters.near
        (low_lat, high_lat), lon_ranges = bounding_box(near)
        where.append("f.lat >= %s AND f.lat <= %s")
        args += [low_lat, high_lat]
        if lon_ranges is not None:
            where.append("(" + " OR ".join("(f.lon >= %s AND f.lon <= %s)" for _ in lon_ranges) + ")")
            args += [x for pair in lon_ranges for x in pair]
        # The haversine distance of `metadata.haversine_km`.
        where.append(
            "2 * %s * asin(least(1.0, sqrt(power(sin(radians(f.lat - %s) / 2), 2) + cos(radians(%s)) * "
            "cos(radians(f.lat)) * power(sin(radians(f.lon - %s) / 2), 2)))) <= %s"
        )
        from clipworks.library.metadata import EARTH_RADIUS_KM

        args += [EARTH_RADIUS_KM, near.lat, near.lat, near.lon, near.km]
    return "".join(f" AND {w}" for w in where), args


@dataclass(frozen=True)
class _SourceFile:
    """One SQLite file row with what a push sends for it."""

    source_id: int
    path: bytes
    fields: tuple[Any, ...]  # FILE_FIELDS after the path
    deleted_at: float | None
    vectors: list[tuple[int | None, float | None, np.ndarray]]  # (moment ordinal or None, time, vector)
    tags: list[tuple[str, float]]
    digest: bytes

    def row(self) -> tuple[Any, ...]:
        return (self.path, *self.fields)


def _read_chunk(db: Any, model: ModelRow, after_id: int, limit: int) -> list[_SourceFile]:
    """Up to ``limit`` files of a SQLite library with ids above ``after_id``, with ``model``'s vectors
    (a photo's one, a video's moments) and the tags, read in the snapshot ``db`` holds."""
    columns = ", ".join(f"CAST({c} AS BLOB)" if c in BYTES_FIELDS else c for c in FILE_FIELDS)
    rows = db.execute(f"SELECT id, {columns} FROM files WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
    if not rows:
        return []
    low, high = rows[0][0], rows[-1][0]
    vectors: dict[int, list[tuple[int | None, float | None, np.ndarray]]] = {}
    width = model.dim * 4
    for file_id, blob in db.execute(
        "SELECT file_id, vector FROM embeddings WHERE model_id = ? AND file_id BETWEEN ? AND ?", (model.id, low, high)
    ):
        if len(blob) == width:
            vectors.setdefault(file_id, []).append((None, None, np.frombuffer(blob, "<f4")))
    for file_id, ordinal, at, blob in db.execute(
        "SELECT file_id, ordinal, time, vector FROM moments WHERE model_id = ? AND file_id BETWEEN ? AND ? "
        "ORDER BY file_id, ordinal",
        (model.id, low, high),
    ):
        if len(blob) == width and ordinal < MOMENT_SLOTS:
            vectors.setdefault(file_id, []).append((ordinal, at, np.frombuffer(blob, "<f4")))
    tags: dict[int, list[tuple[str, float]]] = {}
    for file_id, tag, score in db.execute(
        "SELECT file_id, tag, score FROM tags WHERE file_id BETWEEN ? AND ? ORDER BY file_id, tag", (low, high)
    ):
        tags.setdefault(file_id, []).append((tag, float(score)))
    out = []
    for file_id, path, *fields in rows:
        fields = [_text(v) if name in TEXT_FIELDS else bytes(v) if name in BYTES_FIELDS and v is not None else v
                  for name, v in zip(FILE_FIELDS[1:], fields, strict=True)]  # fmt: skip
        mine = vectors.get(file_id, [])
        digest = hashlib.sha256(repr((fields, [(o, t) for o, t, _ in mine], tags.get(file_id, []))).encode())
        for _, _, vector in mine:
            digest.update(vector.tobytes())
        deleted_at = fields[FILE_FIELDS.index("deleted_at") - 1]
        out.append(_SourceFile(file_id, bytes(path), tuple(fields), deleted_at, mine, tags.get(file_id, []),
                               digest.digest()))  # fmt: skip
    return out


class PostgresLibrary(LibraryBase):
    """A shared library in Postgres, searched as `Library` searches a SQLite one: the same query language,
    filters, pages and `Hit` results. ``model`` as for `Library`: None means the one model the store holds
    vectors for, loaded from where it was indexed from."""

    def __init__(
        self, url: str, model: Any = None, *, exact: bool = False, ef_search: int | None = None, **load_opts: Any
    ) -> None:
        self.url = url
        self.exact = exact
        self.ef_search = ef_search
        self._init_model(model, load_opts)
        self.store  # noqa: B018 -- connect now, so a bad URL fails here

    def _open_store(self) -> PostgresStore:
        return PostgresStore(self.url)

    @property
    def store(self) -> PostgresStore:
        return super().store  # type: ignore[no-any-return]

    @property
    def where(self) -> str:
        return redacted(self.url)

    def push(self, source: Store, on_chunk: Callable[[int], None] = lambda _n: None) -> PushReport:
        """Push every model of the SQLite library ``source`` (the one this library searches when given)."""
        report = PushReport()
        self.store.push_roots(source)
        for model in source.models():
            part = self.store.push(source, model, on_chunk)
            report.files += part.files
            report.unchanged += part.unchanged
            report.vectors += part.vectors
            report.tags += part.tags
            report.index_s += part.index_s
        self._row = None
        return report

    def _rank(
        self,
        vector: np.ndarray,
        top_k: int,
        threshold: float | None,
        exclude: Sequence[int],
        filters: Filters | None,
        offset: int,
    ) -> list[tuple[int, float]]:
        return self.store.ranked(self.model_row, vector, top_k=top_k, threshold=threshold, exclude=exclude,
                                 filters=filters or None, offset=offset, exact=self.exact,
                                 ef_search=self.ef_search)  # fmt: skip

    def _local_times(self, file_ids: list[int]) -> dict[int, float | None]:
        return self.store.local_times(file_ids)

    def _recent(self, top_k: int, filters: Filters | None, offset: int) -> list[int]:
        return self.store.recent(self.model_row, filters or None, top_k, offset)

    def month_counts(self, filters: Filters | None = None) -> list[tuple[str, int]]:
        return self.store.month_counts(self.model_row, filters or None)

    def vectors_of(self, keys: Sequence[int]) -> np.ndarray:
        return self.store.vectors_of(self.model_row, keys)

    def photo_vectors(self) -> ExactIndex:
        return ExactIndex(*self.store.live_vectors(self.model_row, photos_only=True))

    def key_counts(self) -> tuple[int, int]:
        return self.store.key_counts(self.model_row)

    def folders(self) -> list[str]:
        return self.store.roots()

    def cameras(self) -> list[tuple[str, int]]:
        return self.store.camera_counts()

    @property
    def cache_key(self) -> str:
        return self.where


def push_library(db: Store, url: str, on_chunk: Callable[[int], None] = lambda _n: None) -> PushReport:
    """Push the SQLite library ``db`` into the store at ``url``."""
    with PostgresLibrary(url) as shared:
        return shared.push(db, on_chunk)


def is_store_url(text: str | None) -> bool:
    return text is not None and bool(re.match(r"^[a-z][a-z0-9+.-]*://", text))
