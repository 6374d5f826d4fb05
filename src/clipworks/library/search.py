"""Queries and exact top-k search over the stored vectors.

A query is a weighted sum of unit vectors: texts (``beach``, ``+beach``, ``-people``, ``2:cat``,
``--not people``), images and stored photos; the sum is normalised and every photo is scored by cosine
similarity. The matrix of a model's vectors is cached in memory and in a memory-mapped side file beside
the database, both keyed by the database's random id and generation counter, so a query costs one
matrix-vector product instead of reading every BLOB out of SQLite.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from clipworks import ops
from clipworks.atomic import atomic_path, held_lock
from clipworks.errors import UsageError
from clipworks.library.store import ModelRow, Revision, Store, damaged, rows_of_files


class Hit(NamedTuple):
    """A photo, or with ``time`` a moment that many seconds into a video."""

    path: str
    score: float
    time: float | None = None


@dataclass(frozen=True)
class Term:
    kind: Literal["text", "image"]
    value: str
    weight: float = 1.0


_WEIGHT = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+):(.+)$", re.S)


def parse_term(arg: str, kind: Literal["text", "image"] = "text") -> Term | None:
    """``+x`` / ``-x`` / ``N:x`` / ``-N:x`` become a term; a plain word returns None (joined by the caller)."""
    m = _WEIGHT.match(arg)
    if m and not (kind == "image" and Path(arg).exists()):
        sign = -1.0 if m.group(1) == "-" else 1.0
        return Term(kind, m.group(3).strip(), sign * float(m.group(2)))
    if len(arg) > 1 and arg[0] in "+-":
        return Term(kind, arg[1:].strip(), -1.0 if arg[0] == "-" else 1.0)
    return None


def parse_query(words: Sequence[str] = (), *, negatives: Sequence[str] = (), images: Sequence[str] = ()) -> list[Term]:
    """Consecutive plain words form one prompt (``a dog on a beach``); prefixed words are terms of their own."""
    terms: list[Term] = []
    plain: list[str] = []

    def flush() -> None:
        if plain:
            terms.append(Term("text", " ".join(plain)))
            plain.clear()

    for word in words:
        term = parse_term(word)
        if term is None:
            plain.append(word)
        else:
            flush()
            terms.append(term)
    flush()
    terms += [Term("text", n, -1.0) for n in negatives]
    for image in images:
        terms.append(parse_term(image, "image") or Term("image", image))
    for term in terms:
        if not term.value:
            raise UsageError("empty query term: write +text, -text or N:text")
        if term.weight == 0:
            raise UsageError(f"query term {term.value!r} has weight 0")
    if not any(t.weight > 0 for t in terms):
        raise UsageError(
            "a query needs at least one positive term to look for (a text or an example image); "
            "a minus term only takes away"
        )
    return terms


def query_texts(terms: Sequence[Term]) -> list[str]:
    """The texts to encode for ``terms``, in order: the rows :func:`combine_terms` expects."""
    return [t.value for t in terms if t.kind == "text"]


def combine_terms(
    terms: Sequence[Term], text_vectors: np.ndarray | None, image_vector: Callable[[str], np.ndarray]
) -> np.ndarray:
    """One query vector from parsed terms: each term's unit vector times its weight, summed, normalised.

    ``text_vectors`` holds one row per :func:`query_texts` entry (encoded however the caller encodes:
    directly, or on the service's worker); ``image_vector`` gives an image term's vector from its value.
    """
    texts = iter(() if text_vectors is None else text_vectors)
    vectors = [next(texts) if t.kind == "text" else image_vector(t.value) for t in terms]
    weights = np.asarray([t.weight for t in terms], np.float32)
    query = (weights[:, None] * ops.l2_normalize(np.stack(vectors).astype(np.float32))).sum(axis=0)
    if float(np.linalg.norm(query)) < 1e-6:
        raise UsageError("the query terms cancel out; weight the positive ones higher")
    return ops.l2_normalize(query)


# A filtered search gathers its rows when they are fewer than this fraction of all rows; above it one
# sequential product over the whole matrix is cheaper than gathering scattered rows (memory-mapped).
GATHER_FRACTION = 0.25
GATHER_BLOCK = 65_536
# Gathers of at most this many rows tell the kernel their pages first (``scattered_rows``): a hint costs
# ~10 us a row, which a cold row repays a thousand times and a cached one does not, so not for big gathers.
HINTED_ROWS = 256


def scattered_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` for a few scattered ``rows``. Of a memory-mapped side file, the pages holding them
    are first asked for together (``MADV_WILLNEED``): gathered one page fault at a time, each fault also
    reads ahead as if the file were read in order, and 64 rows of a 20 GB side file out of the page cache
    took 0.86 s (p50, a 2-core VM's disk) where the hinted gather took 1.4 ms."""
    mapping = getattr(matrix, "_mmap", None)
    # Only a whole memmap (its base is the mapping): a slice's offset into the mapping is not known here.
    if mapping is not None and matrix.base is mapping and 0 < len(rows) <= HINTED_ROWS and hasattr(mapping, "madvise"):
        import mmap

        start_of_array = matrix.offset % mmap.ALLOCATIONGRANULARITY  # numpy maps from a granularity boundary
        row_bytes = matrix.strides[0]
        for row in np.asarray(rows, np.int64).tolist():
            begin = start_of_array + row * row_bytes
            page = begin - begin % mmap.PAGESIZE
            with contextlib.suppress(OSError):  # a hint: where the kernel refuses it the gather is the same
                mapping.madvise(mmap.MADV_WILLNEED, page, begin + row_bytes - page)
    return np.asarray(matrix[rows])


class VectorIndex(Protocol):
    """What search needs of an index: exact here; an approximate one (FAISS, HNSW) would fit the same slot.

    ``rows`` (positions in ``ids``, ascending) limits the search to those rows *before* ranking: a filter
    matching only poorly scoring photos still gets its ``k`` best among them."""

    ids: np.ndarray

    def top_k(
        self,
        query: np.ndarray,
        k: int,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


class ExactIndex:
    """Brute-force cosine over L2-normalised rows: one matrix-vector product and an argpartition."""

    def __init__(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        self.ids = ids
        self.matrix = matrix

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query: np.ndarray) -> np.ndarray:
        return self.matrix @ np.asarray(query, np.float32)

    def rows_of(self, file_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows (ascending) of those of ``file_ids`` that have a vector here."""
        wanted = np.unique(np.asarray(file_ids, np.int64))
        at = np.searchsorted(self.ids, wanted)
        inside = at < len(self.ids)
        at = at[inside]
        return at[self.ids[at] == wanted[inside]]

    def vectors_of(self, file_ids: Sequence[int]) -> np.ndarray:
        """The rows of ``file_ids`` (each must have a vector here), in that order."""
        wanted = np.asarray(file_ids, np.int64)
        at = np.searchsorted(self.ids, wanted)
        if len(wanted) and (at.max() >= len(self.ids) or not np.array_equal(self.ids[at], wanted)):
            raise UsageError("some of those photos have no vector in the library: index them first")
        return np.asarray(scattered_rows(self.matrix, at), np.float32).reshape(len(wanted), self.matrix.shape[1])

    def subset_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of ``rows`` only: gathered a block at a time when few, else read off one full product."""
        query = np.asarray(query, np.float32)
        if len(rows) >= GATHER_FRACTION * len(self.ids):
            return self.scores(query)[rows]
        parts = [np.asarray(self.matrix[rows[i : i + GATHER_BLOCK]]) @ query for i in range(0, len(rows), GATHER_BLOCK)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def top_k(
        self,
        query: np.ndarray,
        k: int,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(file ids, scores) of the ``k`` best rows (of ``rows`` when given), highest first; rows below
        ``threshold`` left out."""
        if len(self.ids) == 0 or k <= 0 or (rows is not None and len(rows) == 0):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if rows is None:
            ids, scores = self.ids, self.scores(query)
        else:
            ids, scores = self.ids[rows], self.subset_scores(query, rows)
        return rank(ids, scores, k, threshold, exclude)


def rank(
    ids: np.ndarray, scores: np.ndarray, k: int, threshold: float | None = None, exclude: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of (ids, scores), by score then id (reproducible), without ``exclude`` and those
    below ``threshold``. ``scores`` may be changed."""
    if exclude:
        scores[np.isin(ids, np.asarray(exclude, np.int64))] = -np.inf
    best, _ = ops.top_k(scores, k, ids)
    best = best[np.isfinite(scores[best])]
    if threshold is not None:
        best = best[scores[best] >= threshold]
    return ids[best], scores[best]


def cache_dir_for(db: Path) -> Path:
    return db.with_name(db.name + "-vectors")


class SideRows:
    """A matrix whose row i is ``physical[rows[i]]``: the rows of a side file in key order after changes
    were appended at its end (`MatrixCache`). It reads as an array's rows do: a slice is another such view,
    an index array gathers those rows (hinted, see ``scattered_rows``), ``@ query`` scores every row, and
    ``np.asarray`` gathers them all."""

    ndim = 2

    def __init__(self, physical: np.ndarray, rows: np.ndarray) -> None:
        self.physical = physical  # the whole memory map: dead rows (replaced, removed) are never read
        self.rows = rows
        self.shape = (len(rows), int(physical.shape[1]))
        self.dtype = physical.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | slice | np.ndarray) -> SideRows | np.ndarray:
        if isinstance(item, slice):
            return SideRows(self.physical, self.rows[item])
        if np.ndim(item) == 0:  # one row
            return np.asarray(self.physical[self.rows[item]])
        return scattered_rows(self.physical, self.rows[np.asarray(item)])

    def __matmul__(self, query: np.ndarray) -> np.ndarray:
        return np.asarray(self.physical @ query)[self.rows]  # one sequential pass, dead rows included

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        gathered = np.asarray(self.physical[self.rows])
        return gathered if dtype is None else gathered.astype(dtype, copy=False)


# A change to fewer than this fraction of the files is appended to the side file (the files it touched read
# from SQLite); more, and the whole file is written again. So is a file whose dead rows (of vectors since
# replaced or removed) would pass the second fraction of it.
EXTEND_FRACTION = 0.1
DEAD_FRACTION = 0.25
# What the side files and approximate indexes of a library write in its folder: another library id's are
# removed (one deleted and made again at the same path), whatever the age of the clipworks that made them.
CACHE_SUFFIXES = (".npy", ".npz", ".f32", ".f16", ".tail", ".faiss", ".faiss.json")
# A generation's map is saved as its difference from the last map saved whole (the keys it drops, the keys
# and rows it adds) while that difference holds at most this fraction of its keys: a whole map is 16 bytes
# a key (160 MB at 10M photos), which every `index add` would otherwise write again.
DELTA_FRACTION = 1 / 16


class _Map(NamedTuple):
    """Which rows of a side file hold one revision's vectors: ``ids`` sorted, ``rows`` their rows in the
    file (empty: row i holds ids[i]), ``token`` names the file, ``count`` how many rows it had then;
    ``whole`` the map saved whole that this one was read or made from, None where it is that map."""

    revision: Revision
    ids: np.ndarray
    rows: np.ndarray
    token: str
    count: int
    whole: _Map | None = None

    def row_of_each(self) -> np.ndarray:
        return self.rows if len(self.rows) else np.arange(len(self.ids), dtype=np.int64)

    def difference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keys of ``whole`` this map drops, and the keys (sorted) and rows it adds. A row below the
        whole map's count can only be one it mapped, to the same key: rows are appended, never reused."""
        assert self.whole is not None
        rows = self.row_of_each()
        inherited = rows < self.whole.count
        kept = np.zeros(len(self.whole.ids), bool)
        kept[np.searchsorted(self.whole.ids, self.ids[inherited])] = True
        return self.whole.ids[~kept], self.ids[~inherited], rows[~inherited]

    @staticmethod
    def applied(whole: _Map, revision: Revision, count: int, dropped: np.ndarray, added: np.ndarray,
                added_rows: np.ndarray) -> _Map:  # fmt: skip
        """The map that ``difference`` described, made again from ``whole`` (ValueError where it does not
        fit: a key it drops that the whole map lacks)."""
        kept = np.ones(len(whole.ids), bool)
        at = np.searchsorted(whole.ids, dropped)
        if len(dropped) and (int(at.max()) >= len(whole.ids) or not np.array_equal(whole.ids[at], dropped)):
            raise ValueError("the difference drops keys the whole map lacks")
        kept[at] = False
        return whole.merged(kept, added, added_rows, revision, count, whole)

    def merged(self, kept: np.ndarray, added: np.ndarray, added_rows: np.ndarray, revision: Revision, count: int,
               whole: _Map | None) -> _Map:  # fmt: skip
        """This map's ``kept`` keys with ``added`` (sorted) at ``added_rows``, in key order."""
        kept_ids, kept_rows = self.ids[kept], self.row_of_each()[kept]
        at = np.searchsorted(kept_ids, added)
        ids, rows = np.insert(kept_ids, at, added), np.insert(kept_rows, at, added_rows)
        return _Map(revision, ids, rows, self.token, count, whole)


class MatrixCache:
    """The current matrix of one model: in memory, else the side file, else rebuilt from SQLite.

    The side file lets a fresh process start with a memory map instead of decoding every BLOB. In
    ``<db>-vectors/``: the rows, raw float32 (``<library id>-m<model>.<token>.f32``), which are only ever
    appended to, and for each generation a map of which row holds each key (``...-g<generation>.rows.npz``),
    saved whole or as its difference from the last map saved whole. A change since a mapped generation
    appends the vectors of the files it touched (`Store.files_changed_since`) and maps the new generation:
    at 10M photos an `index add` of a few photos writes a few MB, not the 20 GB of every row or the 160 MB
    of a whole map. Names start with the random id the database got when it was created, so a library deleted
    and made again at the same path (whose generation counts up from 0 again) never reads the old one's
    vectors; anything else in the folder of this model, or of another library id, is removed.
    """

    def __init__(self, db: Path, model: ModelRow, *, side_file: bool = True) -> None:
        self.db = db
        self.model = model
        self.side_file = side_file
        self.key: Revision | None = None
        self.index: ExactIndex = ExactIndex(np.zeros(0, np.int64), np.zeros((0, model.dim), np.float32))

    def get(self, store: Store) -> ExactIndex:
        if store.revision() != self.key:
            self.index, self.key = self._load(store)
        return self.index

    def _base(self, library_id: int) -> Path:
        return cache_dir_for(self.db) / f"{library_id:016x}-m{self.model.id}"

    def _map_file(self, library_id: int, generation: int) -> Path:
        return self._base(library_id).with_name(f"{self._base(library_id).name}-g{generation}.rows.npz")

    def _rows_file(self, library_id: int, token: str) -> Path:
        return self._base(library_id).with_suffix(f".{token}.f32")

    def _load(self, store: Store) -> tuple[ExactIndex, Revision]:
        if self.side_file:
            key = store.revision()
            if (opened := self._open(key)) is not None:
                return opened, key
            with contextlib.suppress(OSError):  # a full disk or a read-only folder: held in memory instead
                return self._update(store)
        with store.snapshot():
            return ExactIndex(*store.live_vectors(self.model)), store.revision()

    def _read_map(self, library_id: int, generation: int, *, whole_only: bool = False) -> _Map | None:
        """The map saved for ``generation``, or None (none, not whole, from before schema 8's stamps, or
        a difference from a whole map that is gone or is not the one it was made from)."""
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            with np.load(self._map_file(library_id, generation), allow_pickle=False) as saved:
                revision = Revision(library_id, generation, int(saved["stamp"]))
                token, count = str(saved["token"]), int(saved["count"])
                if "whole" not in saved.files:
                    found = _Map(revision, saved["ids"], saved["rows"], token, count)
                elif whole_only:
                    return None
                else:
                    whole = self._read_map(library_id, int(saved["whole"]), whole_only=True)
                    if whole is None or (whole.revision.stamp, whole.token) != (int(saved["whole_stamp"]), token):
                        return None
                    found = _Map.applied(whole, revision, count, saved["dropped"], saved["added"], saved["added_rows"])
            consistent = found.ids.ndim == 1 and (
                len(found.rows) == len(found.ids) if len(found.rows) else found.count == len(found.ids)
            )
            if consistent and self._rows_file(library_id, found.token).stat().st_size >= found.count * self._row_bytes:
                return found
        return None

    @property
    def _row_bytes(self) -> int:
        return self.model.dim * 4

    def _open(self, key: Revision) -> ExactIndex | None:
        """The side file as mapped for ``key``, or None (not made yet, not whole, of another history, or
        removed by another process's rewrite since its map was read: this one is run without the lock)."""
        found = self._read_map(key.library_id, key.generation)
        if found is None or found.revision != key:
            return None
        return self._mapped(found)

    def _mapped(self, found: _Map) -> ExactIndex | None:
        """The side file's rows as ``found`` maps them, or None (gone or cut short since)."""
        if found.count == 0:
            return ExactIndex(found.ids, np.zeros((0, self.model.dim), np.float32))
        try:
            rows_file = self._rows_file(found.revision.library_id, found.token)
            physical = np.memmap(rows_file, np.float32, "r", shape=(found.count, self.model.dim))
        except (OSError, ValueError):  # gone, or cut short, since the map was read
            return None
        if not len(found.rows):
            return ExactIndex(found.ids, physical)
        if int(found.rows.max()) >= found.count:
            return None
        return ExactIndex(found.ids, SideRows(physical, found.rows))

    def _update(self, store: Store) -> tuple[ExactIndex, Revision]:
        """The side file brought to the store's revision, under a lock beside it (a change is appended
        in place): opened if another process made it meanwhile, else extended, else written anew."""
        library_id = store.revision().library_id
        cache_dir_for(self.db).mkdir(exist_ok=True)
        with held_lock(self._base(library_id).with_suffix(".side.lock")), store.snapshot():
            key = store.revision()
            index = self._open(key) or self._extend(key, store) or self._write(key, store)
            return index, key

    def _extend(self, key: Revision, store: Store) -> ExactIndex | None:
        """The newest earlier generation's side file with the vectors of the files changed since appended,
        or None where that is not worth it (or there is none, or it is of another history)."""
        base = self._newest_map(key)
        if base is None:
            return None
        changed = store.files_changed_since(base.revision, max(1, int(EXTEND_FRACTION * len(base.ids))))
        if changed is None:
            return None
        rows_file = self._rows_file(key.library_id, base.token)
        end = rows_file.stat().st_size // self._row_bytes  # after rows an interrupted append left: never mapped
        keys, vectors = store.live_vectors(self.model, changed)
        kept = np.ones(len(base.ids), bool)
        kept[rows_of_files(base.ids, changed)] = False
        total = end + len(keys)
        if total - (int(kept.sum()) + len(keys)) > DEAD_FRACTION * total:
            return None
        try:
            with rows_file.open("r+b") as fh:
                fh.seek(end * self._row_bytes)
                fh.write(np.ascontiguousarray(vectors, np.float32).tobytes())  # a change's few rows
                fh.flush()
                os.fsync(fh.fileno())  # before the map that points at them
        except OSError:  # a full disk: no map points past ``end`` (this process holds the lock)
            with contextlib.suppress(OSError):
                os.truncate(rows_file, end * self._row_bytes)
            raise
        extended = base.merged(kept, keys, np.arange(end, total, dtype=np.int64), key, total, base.whole or base)
        self._save_map(extended)
        return self._mapped(extended)  # as saved, not read back: at 10M keys the map is 160 MB

    def _newest_map(self, key: Revision) -> _Map | None:
        prefix = f"{self._base(key.library_id).name}-g"
        generations = []
        for path in cache_dir_for(self.db).glob(f"{prefix}*.rows.npz"):
            with contextlib.suppress(ValueError):
                generations.append(int(path.name[len(prefix) : -len(".rows.npz")]))
        earlier = [g for g in generations if g < key.generation]  # a later one is of a history since abandoned
        return self._read_map(key.library_id, max(earlier)) if earlier else None

    def _write(self, key: Revision, store: Store) -> ExactIndex:
        """A new side file for ``key``, streamed from ``store`` a block at a time (10M vectors are 20 GB:
        not read into memory first)."""
        token = secrets.token_hex(4)
        rows_file = self._rows_file(key.library_id, token)
        count = store.live_vector_count(self.model)
        ids = np.empty(count, np.int64)
        filled = 0
        try:
            # Written, not mapped for writing: a disk that fills up mid-file then raises ENOSPC (an OSError,
            # answered by holding the matrix in memory) where a mapping's page would end the process (SIGBUS).
            with rows_file.open("wb") as fh:
                for keys, vectors in store.live_vector_blocks(self.model):
                    if filled + len(keys) > count:
                        raise damaged(self.db, "more vectors came back than it counted")
                    ids[filled : filled + len(keys)] = keys
                    fh.write(memoryview(np.ascontiguousarray(vectors, np.float32)).cast("B"))
                    filled += len(keys)
                fh.flush()
                os.fsync(fh.fileno())
            if filled != count:
                raise damaged(self.db, f"{filled} vectors came back where it counted {count}")
            written = _Map(key, ids, np.zeros(0, np.int64), token, count)
            self._save_map(written)
        except BaseException:
            rows_file.unlink(missing_ok=True)
            raise
        return self._mapped(written) or ExactIndex(ids, np.zeros((0, self.model.dim), np.float32))

    def _save_map(self, found: _Map) -> None:
        """Writes the map of ``found.revision`` (it marks that side file complete), as its difference from
        ``found.whole`` where that is small, then removes what no longer counts: other generations' maps
        (but the whole one a difference needs), other rows files, other libraries' files."""
        library_id, generation, stamp = found.revision
        map_file = self._map_file(library_id, generation)
        arrays = {"ids": found.ids, "rows": found.rows}
        keep = {map_file, self._rows_file(library_id, found.token)}
        if found.whole is not None:
            dropped, added, added_rows = found.difference()
            if len(dropped) + len(added) <= DELTA_FRACTION * len(found.ids):
                whole_generation, whole_stamp = found.whole.revision.generation, found.whole.revision.stamp
                arrays = {"whole": np.array(whole_generation, np.int64), "whole_stamp": np.array(whole_stamp, np.int64),
                          "dropped": dropped, "added": added, "added_rows": added_rows}  # fmt: skip
                keep.add(self._map_file(library_id, whole_generation))
        with atomic_path(map_file) as tmp, tmp.open("wb") as fh:
            np.savez(fh, token=np.array(found.token), count=np.array(found.count), stamp=np.array(stamp, np.int64),
                     **arrays)  # fmt: skip
            fh.flush()
            os.fsync(fh.fileno())
        ours = f"{library_id:016x}-"
        this_model = self._base(library_id).name
        for old in cache_dir_for(self.db).iterdir():
            name = old.name
            mine = name.startswith(f"{this_model}-g") or (name.startswith(f"{this_model}.") and name.endswith(".f32"))
            theirs = not name.startswith(ours) and name.endswith(CACHE_SUFFIXES)
            if old not in keep and (mine or theirs):
                with contextlib.suppress(OSError):  # still mapped by a reader on Windows: removed next time
                    old.unlink()


def duplicate_groups(index: ExactIndex, threshold: float, block: int = 1024) -> list[list[tuple[int, float]]]:
    """Groups of rows whose cosine to another member is at least ``threshold`` (single linkage).

    Each group is (file id, best cosine to another member), the groups largest first. Blocked matrix
    products keep memory at ``block`` x N scores.
    """
    n = len(index.ids)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    best = np.full(n, -np.inf, np.float32)
    matrix = np.asarray(index.matrix)
    for start in range(0, n, block):
        scores = matrix[start : start + block] @ matrix.T
        rows, cols = np.nonzero(scores >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c <= i:
                continue
            s = float(scores[r, c])
            best[i] = max(best[i], s)
            best[c] = max(best[c], s)
            a, b = find(i), find(c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in np.nonzero(np.isfinite(best))[0].tolist():
        groups.setdefault(find(i), []).append(i)
    out = [[(int(index.ids[i]), float(best[i])) for i in members] for members in groups.values()]
    out.sort(key=lambda g: (-len(g), g[0][0]))
    return out


def first_near_duplicate(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """For each row of unit ``vectors`` (in the order they are shown), the first earlier row kept as shown
    whose cosine to it is at least ``threshold``, else the row itself. Greedy over one page (a page is a
    few hundred rows: one small Gram matrix), unlike `duplicate_groups` over the whole library."""
    n = len(vectors)
    gram = vectors @ vectors.T
    first = np.arange(n)
    shown: list[int] = []
    for i in range(n):
        if shown:
            scores = gram[i, shown]
            best = int(np.argmax(scores))
            if scores[best] >= threshold:
                first[i] = shown[best]
                continue
        shown.append(i)
    return first
