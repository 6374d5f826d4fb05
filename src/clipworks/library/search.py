"""Queries and exact top-k search over the stored vectors.

A query is a weighted sum of unit vectors: texts (``beach``, ``+beach``, ``-people``, ``2:cat``,
``--not people``), images and stored photos; the sum is normalised and every photo is scored by cosine
similarity. The matrix of a model's vectors is cached in memory and in a memory-mapped side file beside
the database, both keyed by the database's random id and generation counter, so a query costs one
matrix-vector product instead of reading every BLOB out of SQLite.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from clipworks import ops
from clipworks.atomic import atomic_path
from clipworks.errors import UsageError
from clipworks.library.store import ModelRow, Store, damaged


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
    best, _ = ops.top_k(scores, k)
    best = best[np.lexsort((ids[best], -scores[best]))]
    best = best[np.isfinite(scores[best])]
    if threshold is not None:
        best = best[scores[best] >= threshold]
    return ids[best], scores[best]


def cache_dir_for(db: Path) -> Path:
    return db.with_name(db.name + "-vectors")


class MatrixCache:
    """The current matrix of one model: in memory, else the side file, else rebuilt from SQLite.

    The side file (``<db>-vectors/<library id>-m<model>-g<generation>.npy`` and ``.ids.npy``) lets a fresh
    process start with a memory map instead of decoding every BLOB. Its name is its key: the random id
    the database got when it was created, so that a library deleted and made again at the same path
    (whose generation counts up from 0 again) never reads the old one's vectors, and the generation,
    so that any change rebuilds it. Only a file of exactly this key is opened; others are removed.
    """

    def __init__(self, db: Path, model: ModelRow, *, side_file: bool = True) -> None:
        self.db = db
        self.model = model
        self.side_file = side_file
        self.key: tuple[int, int] | None = None
        self.index: ExactIndex = ExactIndex(np.zeros(0, np.int64), np.zeros((0, model.dim), np.float32))

    def get(self, store: Store) -> ExactIndex:
        if store.side_file_key() != self.key:
            self.index, self.key = self._load(store)
        return self.index

    def _names(self, key: tuple[int, int]) -> tuple[Path, Path]:
        library_id, generation = key
        base = cache_dir_for(self.db) / f"{library_id:016x}-m{self.model.id}-g{generation}"
        return base.with_suffix(".ids.npy"), base.with_suffix(".npy")

    def _load(self, store: Store) -> tuple[ExactIndex, tuple[int, int]]:
        if self.side_file:
            key = store.side_file_key()
            ids_file, matrix_file = self._names(key)
            if matrix_file.is_file() and ids_file.is_file():
                with contextlib.suppress(OSError, ValueError):
                    ids = np.load(ids_file)
                    matrix = np.load(matrix_file, mmap_mode="r")
                    if ids.ndim == 1 and matrix.shape == (len(ids), self.model.dim):
                        return ExactIndex(ids, matrix), key
        with store.snapshot():
            key = store.side_file_key()
            if self.side_file:
                with contextlib.suppress(OSError):  # a full disk or a read-only folder: held in memory instead
                    return self._write(key, store), key
            return ExactIndex(*store.live_vectors(self.model)), key

    def _write(self, key: tuple[int, int], store: Store) -> ExactIndex:
        """The side file of ``key`` streamed from ``store`` a block at a time (10M vectors are 20 GB: not
        read into memory first), opened as a memory map; older ones removed."""
        folder = cache_dir_for(self.db)
        folder.mkdir(exist_ok=True)
        ids_file, matrix_file = self._names(key)
        count, dim = store.live_vector_count(self.model), self.model.dim
        ids = np.empty(count, np.int64)
        if count:
            # Written, not mapped for writing: a disk that fills up mid-file then raises ENOSPC (an OSError,
            # answered by holding the matrix in memory) where a mapping's page would end the process (SIGBUS).
            with atomic_path(matrix_file) as tmp, tmp.open("wb") as fh:  # the matrix last: it marks completion
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(fh, {**header, "shape": (count, dim)})
                filled = 0
                for keys, vectors in store.live_vector_blocks(self.model):
                    if filled + len(keys) > count:
                        raise damaged(self.db, "more vectors came back than it counted")
                    ids[filled : filled + len(keys)] = keys
                    fh.write(memoryview(np.ascontiguousarray(vectors, np.float32)).cast("B"))
                    filled += len(keys)
                if filled != count:
                    raise damaged(self.db, f"{filled} vectors came back where it counted {count}")
                fh.flush()
                with atomic_path(ids_file) as ids_tmp, ids_tmp.open("wb") as ids_fh:
                    np.save(ids_fh, ids)
        self._remove_stale(folder, (ids_file, matrix_file), key)
        if not count:
            return ExactIndex(ids, np.zeros((0, dim), np.float32))
        return ExactIndex(ids, np.load(matrix_file, mmap_mode="r"))

    def _remove_stale(self, folder: Path, keep: tuple[Path, Path], key: tuple[int, int]) -> None:
        """Older generations of this model, and whatever an earlier database at this path left."""
        ours = f"{key[0]:016x}-"
        stale = f"{ours}m{self.model.id}-g"
        for old in folder.glob("*.npy"):
            if old not in keep and (old.name.startswith(stale) or not old.name.startswith(ours)):
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
