"""Approximate nearest-neighbour search for libraries too large for an exact scan: faiss HNSW or IVF-PQ.

The index only proposes candidates. Their scores are recomputed exactly from the full-precision matrix
(the memory-mapped side file ``MatrixCache`` keeps), so every score shown is a true cosine and only recall
is approximate. The memory budget picks the index (``--ann-dtype``; without it, the library's size): an
HNSW graph holding each vector as f32, f16 or i8 (faiss' scalar quantiser), or, from a million photos on,
``pq``: inverted lists of 64-byte product codes (IVF-PQ), a tenth of f16's memory, which needs more
candidates re-ranked for the same recall (``benchmarks/bench_ann.py``: 512 candidates from 64 lists find
the exact top 10 in about 2 ms at 1M vectors, 1,024 find 0.98-0.996 of it in 7-7.5 ms at 10M, on 2 cores,
where the f16 graph alone would take 10 GB and hours to build).

faiss rather than usearch: both were measured (``benchmarks/bench_ann.py``), and usearch 2.26 loads its
NumKong kernels with ``RTLD_GLOBAL``, after which torch's ONNX exporter fails in the same process ("Invalid
function schema: conv2d"), so a program that searches and then exports would break. faiss' HNSW cannot
delete nodes; it does not need to here, since a candidate whose photo is gone or whose vector changed is
dropped or re-scored by the exact re-ranking anyway. Such dead nodes are counted, and once more than a
fifth of the index has changed since it was built it is rebuilt (recall decays as they pile up, and
IVF-PQ's lists and codebooks were trained on vectors that are no longer the library's).

The index lives beside the database as ``<db>-vectors/<library id>-m<model>.faiss`` with the file ids of
its nodes (``.labels.npy``), a one-number signature of each node's vector (``.sig.npy``, to notice a
re-embedded photo without reading vectors back), and a JSON of the revision it reflects, written last.
An IVF-PQ index built over millions of photos also keeps a float16 copy of its nodes' vectors
(``.<build>.f16``, extended in place as nodes are added): its candidates are ranked from that copy and only
the best few are re-scored from the float32 side file, which at 10M (20 GB) no longer stays in memory.

faiss can only write an index whole (695 MiB of IVF-PQ at 10M photos, 1.2 GB of f16 graph at 1M), so an
update that adds a few entries does not: it appends them, each with its file id, signature and float32
vector, to a tail file (``.<write>.tail``, a new name each time the index is written whole), and whoever
opens the index adds the tail's vectors to it again. The index is written whole once the tail holds more
entries than re-adding them at every open is worth (`IndexKind.tail_entries`).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np

from clipworks import ops
from clipworks.atomic import atomic_path, atomic_write_text, held_lock
from clipworks.errors import ClipworksError, UsageError
from clipworks.extras import require
from clipworks.library.search import ExactIndex, rank, scattered_rows
from clipworks.library.store import Revision, rows_of_files

# (revision, most) -> the files whose vectors changed since then, None if unknown or more than ``most``.
ChangedSince = Callable[[Revision, int], "np.ndarray | None"]

AnnMode = Literal["auto", "on", "off"]
AnnDtype = Literal["f32", "f16", "i8", "pq"]
ANN_MODES = ("auto", "on", "off")
ANN_DTYPES = ("f32", "f16", "i8", "pq")
# Without --ann-dtype a library keeps the index it has (a 10M-photo IVF-PQ must not turn into an HNSW
# build because one command left the option out); a library with none gets the f16 graph, or IVF-PQ from
# PQ_DEFAULT_ROWS photos on. At 1M (bench_ann.py, 2 cores) IVF-PQ built in ~1 min into 77 MiB and found the
# whole exact top 10 in 2.6 ms p50, where the f16 graph takes ~14 min and 1.24 GB to build and its walk
# already took 6.2 ms at 330,000.
DEFAULT_ANN_DTYPE: AnnDtype = "f16"
PQ_DEFAULT_ROWS = 1_000_000
# Below this many photos an exact scan already answers in a few milliseconds on one core.
ANN_MIN_ROWS = 100_000
REBUILD_FRACTION = 0.2
CONNECTIVITY = 32  # HNSW's M: links per node
EXPANSION_ADD = 128  # efConstruction
# efSearch. The beam, not the candidate count, sets recall, and a fixed beam finds less as the graph grows:
# on 330,000 512-d clustered vectors with text-like queries (benchmarks/bench_ann.py) 128 found 0.839 of the
# exact top 10, 256 0.951, 512 0.995 (p50 6.2 ms against 1.8 ms at 128, on 2 loaded cores).
EXPANSION_SEARCH = 512
# Candidates fetched per wanted hit before exact re-ranking: recall at k rises with it, cost barely.
OVERSAMPLE = 4
MIN_CANDIDATES = 64
# IVF-PQ lists: faiss' guideline of about 4 sqrt(n) (a power of two), at most 4,096. bench_ann.py, 512-d
# clustered vectors, 64 lists probed and 1,024 candidates re-ranked: at 1M, 1,024 lists found 0.962 of the
# exact top 10 of text-like queries in 3.8 ms and 4,096 lists 1.000 in 2.0 ms (fewer codes per list); at 10M
# 4,096 lists found 0.978-0.996 in 7-7.5 ms, where more lists would cost minutes more k-means per build.
PQ_MAX_LISTS = 4096
PQ_PROBES = 64
# Candidates re-ranked: the coarser the PQ ranking among more codes, the more it needs. At 1M, 512 found the
# whole exact top 10 (1.1-2.1 ms, against 1.9-3.4 ms for 1,024); at 10M, 512 found only 0.928 of image
# queries' top 10 where 1,024 found 0.978.
PQ_CANDIDATES, PQ_CANDIDATES_MANY, PQ_MANY_ENTRIES = 512, 1024, 3_000_000
PQ_DIMS_PER_CODE = 8  # one byte of code per 8 dimensions: 64 bytes for a 512-d vector
PQ_TRAIN_PER_LIST = 40  # k-means wants ~40 training vectors per list (faiss warns below 39)
# From this many photos an IVF-PQ build keeps a float16 copy of each entry's vector beside its codes: the
# candidates are ranked from it, and only the best few (as many as an HNSW graph proposes) are re-scored
# from the float32 side file. At 10M (bench_ann.py, 2 cores, 24 GB) the side file is 20.5 GB and does not
# stay in the page cache, so re-ranking 1,024 rows from it took 11-16 ms p50 where faiss itself answers in
# 7 ms; the copy is half the size, and it is read where the candidates are.
PQ_HALF_COPY_ENTRIES = 3_000_000
SIGNATURE_TOLERANCE = 1e-4
# A float16 row's signature lies within ~3e-4 of its float32 vector's (rounding of 2**-11 per component);
# another vector's lies O(1) away.
HALF_TOLERANCE = 1e-2
# A filter letting through at most this fraction of the photos is answered by an exact scan of just those:
# cheaper than that fraction of a full scan, and a graph walk would meet few allowed nodes (poor recall).
FILTER_EXACT_FRACTION = 0.2
_SIGNATURE_SEED = 20261202


def check_ann_options(mode: str, dtype: str | None) -> None:
    if mode not in ANN_MODES:
        raise UsageError(f"ann mode must be one of {', '.join(ANN_MODES)}, not {mode!r}")
    if dtype is not None and dtype not in ANN_DTYPES:
        raise UsageError(f"ann dtype must be one of {', '.join(ANN_DTYPES)}, not {dtype!r}")


def wants_ann(mode: AnnMode, rows: int) -> bool:
    return mode == "on" or (mode == "auto" and rows >= ANN_MIN_ROWS)


@dataclass
class AnnState:
    """The JSON beside the index: what it reflects. Written after the index, so it marks a complete save."""

    generation: int
    dtype: str
    dim: int
    count: int  # live vectors it answers for
    nodes: int  # entries in the index, dead ones included
    changed_since_build: int
    # The name of this build's float16 copy of its entries' vectors (``<base>.<half>.f16``), "" for none.
    # A new name per build: the copy of the build the state describes is never overwritten by a rebuild.
    half: str = ""
    # The stamp of ``generation`` (`store.Revision`): 0 in a state saved before schema 8, which then never
    # matches and is brought up to date by comparing every row.
    stamp: int = 0
    # The tail file (``<base>.<tail>.tail``) and how many of the ``nodes`` are in it, not in the index file.
    tail: str = ""
    tail_entries: int = 0

    def reflects(self, revision: Revision) -> bool:
        return (self.generation, self.stamp) == (revision.generation, revision.stamp)


def _faiss() -> Any:
    require("faiss", "ann", "approximate search (--ann)")
    import faiss

    return faiss


def signatures(matrix: np.ndarray, block: int = 65_536) -> np.ndarray:
    """One number per row (its dot product with a fixed random direction): changes when the vector does."""
    probe = np.random.default_rng(_SIGNATURE_SEED).standard_normal(matrix.shape[1]).astype(np.float32)
    return np.concatenate([np.asarray(matrix[i : i + block], np.float32) @ probe for i in range(0, len(matrix), block)]
                          or [np.zeros(0, np.float32)])  # fmt: skip


class IndexKind:
    """What differs between the faiss indexes behind one ``AnnIndex``: how one is made and trained, the
    search settings a saved file does not keep, how many candidates it must propose for the exact
    re-ranking to find the true top k, and how a filter is passed to its search."""

    def name(self, dim: int | None = None) -> str:
        raise NotImplementedError

    def new(self, dim: int, matrix: np.ndarray) -> Any:
        """An empty index, trained on a sample of ``matrix`` where it must learn from the data."""
        raise NotImplementedError

    def prepare(self, index: Any) -> None:
        """Today's search settings (a saved index keeps the ones it was built with)."""
        raise NotImplementedError

    def candidates(self, k: int, excluded: int, entries: int) -> int:
        """How many to propose for the top ``k`` (``excluded`` of them to be left out) of ``entries``."""
        raise NotImplementedError

    def parameters(self, selector: Any) -> Any:
        raise NotImplementedError

    def keeps_half_copy(self, entries: int) -> bool:
        """Whether a build over ``entries`` vectors keeps a float16 copy of them to rank candidates from."""
        return False

    # Entries an update may append to the tail file before the index is written whole again: every process
    # that opens the index adds them to it, so at most what that costs in a fraction of a second.
    tail_entries = 0


class HnswKind(IndexKind):
    """A graph of every vector, stored as f32, f16 or i8: candidates near the query in a few hundred hops."""

    # Inserting one node into the graph took 1.2-2.3 ms on 2 cores (f16, efConstruction 128): 128 cost
    # 0.15-0.3 s at each open, where writing the graph whole at 1M photos (1.2 GB) costs seconds.
    tail_entries = 128

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def name(self, dim: int | None = None) -> str:
        return f"HNSW ({self.dtype})"

    def new(self, dim: int, matrix: np.ndarray) -> Any:
        faiss = _faiss()
        if self.dtype == "f32":
            graph = faiss.IndexHNSWFlat(dim, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        else:
            kind = faiss.ScalarQuantizer.QT_fp16 if self.dtype == "f16" else faiss.ScalarQuantizer.QT_8bit
            graph = faiss.IndexHNSWSQ(dim, kind, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EXPANSION_ADD
        self.prepare(graph)
        if not graph.is_trained:  # the 8-bit quantiser learns each dimension's range
            graph.train(_sample(matrix, 100_000))
        return graph

    def prepare(self, index: Any) -> None:
        index.hnsw.efSearch = EXPANSION_SEARCH

    def candidates(self, k: int, excluded: int, entries: int) -> int:
        return max(k * OVERSAMPLE + excluded, MIN_CANDIDATES)

    def parameters(self, selector: Any) -> Any:
        return _faiss().SearchParametersHNSW(sel=selector, efSearch=EXPANSION_SEARCH)


class IvfPqKind(IndexKind):
    """Vectors in k-means lists as product codes (one byte per 8 dimensions): a query scans the codes of its
    nearest lists. Coarse scores, so many candidates go to the exact re-ranking."""

    # Adding an entry (its nearest of 4,096 lists, then its code) took 27-54 us on 2 cores: 8,192 cost
    # 0.2-0.45 s at each open, against writing 695 MiB of index at 10M photos.
    tail_entries = 8192

    def name(self, dim: int | None = None) -> str:
        return f"IVF-PQ ({_pq_bytes(dim)}-byte codes)" if dim else "IVF-PQ"

    def new(self, dim: int, matrix: np.ndarray) -> Any:
        faiss = _faiss()
        rows = len(matrix)
        lists = _pq_lists(rows)
        bits = min(8, max(1, rows.bit_length() - 1))  # a codebook of 2**bits entries needs that many vectors
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, _pq_bytes(dim), bits, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # a small library trains on what it has, without warnings
        index.pq.cp.min_points_per_centroid = 1
        index.train(_sample(matrix, lists * PQ_TRAIN_PER_LIST))
        self.prepare(index)
        return index

    def prepare(self, index: Any) -> None:
        index.nprobe = min(PQ_PROBES, index.nlist)
        # The library asks one query at a time, and faiss' default spreads the work over queries: it then
        # scans the probed lists on one thread. Splitting the lists over the threads instead took a 1M-vector
        # search from 0.97-1.01 ms to 0.74-0.79 ms p50 on 2 cores (512 candidates, 64 lists probed).
        index.parallel_mode = 1

    def candidates(self, k: int, excluded: int, entries: int) -> int:
        floor = PQ_CANDIDATES_MANY if entries >= PQ_MANY_ENTRIES else PQ_CANDIDATES
        return max(k * OVERSAMPLE + excluded, floor)

    def parameters(self, selector: Any) -> Any:
        return _faiss().SearchParametersIVF(sel=selector, nprobe=PQ_PROBES)

    def keeps_half_copy(self, entries: int) -> bool:
        return entries >= PQ_HALF_COPY_ENTRIES


def index_kind(dtype: str) -> IndexKind:
    return IvfPqKind() if dtype == "pq" else HnswKind(dtype)


def _pq_lists(rows: int) -> int:
    guideline = 1 << max(0, round(math.log2(4 * math.sqrt(max(rows, 1)))))
    return max(1, min(PQ_MAX_LISTS, guideline, rows // PQ_TRAIN_PER_LIST))


def _pq_bytes(dim: int) -> int:
    """Sub-quantisers (one code byte each): 8 dimensions apiece, or the nearest count that divides ``dim``."""
    parts = max(1, dim // PQ_DIMS_PER_CODE)
    while dim % parts:
        parts -= 1
    return parts


def _sample(matrix: np.ndarray, rows: int) -> np.ndarray:
    """About ``rows`` rows spread over the whole matrix (a memory-mapped one is read in strides)."""
    return np.ascontiguousarray(matrix[:: max(1, len(matrix) // max(rows, 1))], np.float32)


class AnnIndex:
    """Candidates from a faiss index, exact re-ranking: the same ``top_k`` as ``ExactIndex`` (which it wraps).

    ``half``: a float16 copy of each entry's vector (row = entry); with it the candidates are ranked from the
    copy first and only the best few are re-scored from the float32 matrix."""

    def __init__(
        self,
        exact: ExactIndex,
        index: Any,
        labels: np.ndarray,
        kind: IndexKind,
        half: np.ndarray | None = None,
        node_rows: np.ndarray | None = None,
    ) -> None:
        self.exact = exact  # ids sorted ascending (Store.live_vectors), matrix rows in that order
        self.index = index  # the faiss index that proposes candidates
        self.labels = labels  # index entry -> file id
        self.kind = kind
        self.half = half
        self.ids: np.ndarray = exact.ids
        self._node_rows = node_rows  # ``entry_rows``, once made (an update knows them already)

    def __len__(self) -> int:
        return len(self.ids)

    def top_k(
        self,
        query: np.ndarray,
        k: int,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(self.ids) == 0 or k <= 0 or (rows is not None and len(rows) == 0):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if rows is not None and len(rows) <= FILTER_EXACT_FRACTION * len(self.ids):
            return self.exact.top_k(query, k, threshold, exclude, rows)
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        want = min(self.index.ntotal, self.kind.candidates(k, len(exclude), self.index.ntotal))
        if rows is None:
            _, found = self.index.search(query, want)
        else:  # the search itself skips entries the filter refuses, so the candidates are all allowed ones
            _, found = self.index.search(query, want, params=self._allowing(rows))
        nodes = found[0][found[0] >= 0]
        at = self._rows_of_entries(nodes, rows)  # candidates whose photo is still in the library (and allowed)
        nodes, at = nodes[at >= 0], at[at >= 0]
        final = max(k * OVERSAMPLE, MIN_CANDIDATES)
        if self.half is not None and len(nodes) > final:
            nodes, at = _newest_entries(nodes, at, self.ids, exclude)
            if len(nodes) > final:
                order = np.argsort(nodes)  # ascending entries: the memory map is read front to back
                coarse = np.asarray(self.half[nodes[order]], np.float32) @ query[0]
                at = at[order[ops.top_k(coarse, final)[0]]]
        at = np.unique(at)  # a re-embedded photo may have two entries; ascending rows are mmap-friendly
        scores = np.asarray(scattered_rows(self.exact.matrix, at) @ query[0], np.float32)
        return rank(self.ids[at], scores, k, threshold, exclude)  # ordered as the exact index orders

    def _rows_of_entries(self, nodes: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The row in ``ids`` of each entry's file, -1 where the photo is gone or ``allowed`` leaves it out."""
        at = self.entry_rows()[nodes]
        if allowed is not None:
            place = np.minimum(np.searchsorted(allowed, at), len(allowed) - 1)
            at = np.where(allowed[place] == at, at, -1)
        return at

    def entry_rows(self) -> np.ndarray:
        """Index entry -> row of its file in ``ids`` (-1: the photo is gone), made at the first query: 0.85 s
        at 10M entries, where looking up each query's 1,024 candidates in ``ids`` took about 1 ms."""
        if self._node_rows is None:
            self._node_rows = _entry_rows(self.ids, self.labels)
        return self._node_rows

    def _allowing(self, rows: np.ndarray) -> Any:
        """faiss search parameters admitting only the entries of ``rows``' files (their newest entry, and
        dead ones of the same file, which the re-ranking drops or re-scores anyway)."""
        faiss = _faiss()
        allowed = np.zeros(len(self.ids) + 1, bool)  # the extra last slot stands for entries of no live row
        allowed[rows] = True
        bits = np.packbits(allowed[self.entry_rows()], bitorder="little")
        selector = faiss.IDSelectorBitmap(len(self.labels), faiss.swig_ptr(bits))
        params = self.kind.parameters(selector)
        params._keep = (bits, selector)  # faiss holds raw pointers to both: they must live as long as params
        return params


class _Files(NamedTuple):
    index: Path
    labels: Path
    signatures: Path
    state: Path

    def half(self, name: str) -> Path:
        return self.index.with_suffix(f".{name}.f16")

    def tail(self, name: str) -> Path:
        return self.index.with_suffix(f".{name}.tail")

    def remove_others(self, half: str, tail: str) -> None:
        """Every float16 copy and tail file but the ones the saved state names."""
        for suffix, keep in ((".*.f16", self.half(half)), (".*.tail", self.tail(tail))):
            for old in self.index.parent.glob(self.index.with_suffix(suffix).name):
                if old != keep:
                    with contextlib.suppress(OSError):  # still mapped by a reader on Windows: removed next time
                        old.unlink()


def _tail_record(dim: int) -> np.dtype:
    """One entry of a tail file: what the index, its labels and its signatures hold of it."""
    return np.dtype([("label", "<i8"), ("signature", "<f4"), ("vector", "<f4", (dim,))])


def _newest_entries(
    nodes: np.ndarray, at: np.ndarray, ids: np.ndarray, exclude: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate entries (and their rows ``at``) reduced to one per photo, its newest (the entries of a
    re-embedded photo before it hold its old vector: they would take the places of others in the float16
    ranking), and none of an excluded photo."""
    newest_first = np.argsort(-nodes, kind="stable")
    _, first = np.unique(at[newest_first], return_index=True)
    keep = newest_first[first]
    if exclude:
        keep = keep[~np.isin(ids[at[keep]], np.asarray(exclude, np.int64))]
    return nodes[keep], at[keep]


def _paths(folder: Path, library_id: int, model_id: int) -> _Files:
    base = folder / f"{library_id:016x}-m{model_id}"
    return _Files(*(base.with_suffix(s) for s in (".faiss", ".labels.npy", ".sig.npy", ".faiss.json")))


def _add(
    index: Any,
    matrix: np.ndarray,
    rows: np.ndarray | None = None,
    half: BinaryIO | None = None,
    tail: tuple[BinaryIO, np.ndarray] | None = None,
    block: int = 65_536,
) -> np.ndarray:
    """Adds ``matrix`` (or its ``rows``) to ``index``, as float16 to ``half`` where the index keeps a copy,
    and as records to a tail file where one is given (with the rows' labels); returns the added rows'
    signatures. In blocks, so a memory-mapped matrix is paged in a slice at a time, and read once for all."""
    count = len(matrix) if rows is None else len(rows)
    added = [np.zeros(0, np.float32)]
    for start in range(0, count, block):
        part = matrix[start : start + block] if rows is None else matrix[rows[start : start + block]]
        part = np.ascontiguousarray(part, np.float32)
        index.add(part)
        added.append(signatures(part))
        if half is not None:
            half.write(part.astype(np.float16).tobytes())
        if tail is not None:
            records = np.empty(len(part), _tail_record(part.shape[1]))
            records["label"], records["signature"], records["vector"] = tail[1][start : start + block], added[-1], part
            tail[0].write(records.tobytes())
    return np.concatenate(added)


@contextlib.contextmanager
def _appender(path: Path | None, entries: int, row_bytes: int) -> Iterator[BinaryIO | None]:
    """A float16 copy or a tail file opened for writing after its first ``entries`` rows (a new file at 0),
    and flushed to disk on the way out: the state written after it says how many rows are good. Readers of
    an older state read fewer rows, which are never written again."""
    if path is None:
        yield None
        return
    with path.open("r+b" if entries else "wb") as fh:
        fh.seek(entries * row_bytes)
        yield fh
        fh.truncate()  # rows an interrupted update left past the end
        fh.flush()
        os.fsync(fh.fileno())


def _open_half(path: Path, entries: int, dim: int) -> np.ndarray | None:
    """The first ``entries`` rows of a float16 copy, memory-mapped; None if it is missing or short."""
    if entries == 0:
        return np.zeros((0, dim), np.float16)
    with contextlib.suppress(OSError, ValueError):
        if path.stat().st_size >= entries * dim * 2:
            copy = np.memmap(path, np.float16, "r", shape=(entries, dim))
            # Only ever read at scattered rows: a page missing from the cache is read alone, without the
            # readahead meant for files read in order (which made each such row cost milliseconds).
            with contextlib.suppress(AttributeError, OSError):
                copy._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
            return copy
    return None


def _read_tail(path: Path, entries: int, dim: int) -> np.ndarray | None:
    """The first ``entries`` records of a tail file; None if it is missing or short."""
    record = _tail_record(dim)
    with contextlib.suppress(OSError, ValueError):
        with path.open("rb") as fh:
            tail = np.fromfile(fh, record, count=entries)
        if len(tail) == entries:
            return tail
    return None


def _read_state(path: Path) -> AnnState | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return AnnState(**json.loads(path.read_text(encoding="utf-8")))
    return None


def _open(files: _Files, state: AnnState, kind: IndexKind) -> tuple[Any, np.ndarray, np.ndarray, Any] | None:
    try:
        index = _faiss().read_index(str(files.index))
        kind.prepare(index)
        labels, sigs = np.load(files.labels), np.load(files.signatures)
    except Exception:  # faiss raises RuntimeError, numpy ValueError or OSError: any of them means rebuild
        return None
    written = state.nodes - state.tail_entries
    if index.ntotal != written or len(labels) != written or len(sigs) != written:
        return None
    if state.tail_entries:
        tail = _read_tail(files.tail(state.tail), state.tail_entries, state.dim)
        if tail is None:
            return None
        index.add(np.ascontiguousarray(tail["vector"]))
        labels, sigs = np.concatenate([labels, tail["label"]]), np.concatenate([sigs, tail["signature"]])
    sigs = sigs.astype(np.float32)
    half = _open_half(files.half(state.half), state.nodes, state.dim) if state.half else None
    if state.half and (half is None or not _copy_matches(half, sigs)):
        return None
    return index, labels.astype(np.int64), sigs, half


def _copy_matches(half: np.ndarray, sigs: np.ndarray, samples: int = 64) -> bool:
    """Whether the float16 copy holds the vectors the entries were added with, by their signatures at a few
    entries: a rebuild killed after it replaced the index files but before its state was written leaves
    the old build's copy beside the new build's entries (the same count, other vectors)."""
    entries = np.unique(np.linspace(0, len(sigs) - 1, min(samples, len(sigs))).astype(np.int64))
    return bool(np.all(np.abs(signatures(np.asarray(half[entries], np.float32)) - sigs[entries]) <= HALF_TOLERANCE))


def sync_ann(
    folder: Path,
    key: Revision,
    model_id: int,
    exact: ExactIndex,
    dtype: AnnDtype | None = None,
    log: Callable[[str], None] = lambda _m: None,
    changed_since: ChangedSince | None = None,
) -> AnnIndex:
    """The library's approximate index for ``key`` (the revision ``exact`` is of): opened, updated in place or
    rebuilt. ``dtype`` None: the one the saved index has. One process at a time updates it (a lock file
    beside it): the float16 copy is extended in place. ``changed_since`` (`Store.files_changed_since`) names
    the files whose vectors may differ from the saved index's; without it every row is compared."""
    files = _paths(folder, key.library_id, model_id)
    state = _read_state(files.state)
    chosen = _chosen(dtype, state, len(exact.ids))
    if state is not None and state.reflects(key) and (opened := _open_matching(files, state, chosen, exact)):
        return AnnIndex(exact, opened[0], opened[1], index_kind(chosen), opened[3])  # no lock, no writes
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):  # a library on a read-only share: searched all the same
        log(f"ann index: {folder} cannot be written: the index is updated in memory, for this process only")
        return _update(files, key, exact, dtype, log, changed_since, save=False)

    def waiting(holder: str) -> None:
        log(f"ann index: waiting for {f'pid {holder}' if holder else 'another process'} to finish updating it")

    try:
        with held_lock(files.index.with_suffix(".lock"), waiting):
            return _update(files, key, exact, dtype, log, changed_since)
    except OSError as e:  # a full disk, most often: the saved index is as it was (each file is replaced whole)
        raise ClipworksError(
            f"cannot save the search index in {folder} ({e.strerror or e}): free some space, or search with --ann off"
        ) from None


def _open_matching(
    files: _Files, state: AnnState, dtype: str, exact: ExactIndex
) -> tuple[Any, np.ndarray, np.ndarray, Any] | None:
    if state.dtype != dtype or state.dim != exact.matrix.shape[1]:
        return None
    return _open(files, state, index_kind(dtype))


def _update(
    files: _Files,
    key: Revision,
    exact: ExactIndex,
    asked: AnnDtype | None,
    log: Callable[[str], None],
    changed_since: ChangedSince | None = None,
    save: bool = True,
) -> AnnIndex:
    """``sync_ann``'s work under its lock. ``save`` False: nothing is written (the folder is read-only), and
    the index answers without a float16 copy (its new entries would have no rows in the saved one)."""
    ids, matrix = exact.ids, exact.matrix
    dim = int(matrix.shape[1])
    state = _read_state(files.state)  # again: another process may have updated it while this one waited
    dtype = _chosen(asked, state, len(ids))
    kind = index_kind(dtype)
    opened = _open_matching(files, state, dtype, exact) if state is not None else None
    if opened is not None and state is not None and state.reflects(key):
        return AnnIndex(exact, opened[0], opened[1], kind, opened[3])
    changed, appending, tail_name, tail_entries = 0, False, "", 0
    if opened is not None and state is not None:
        index, labels, sigs, _ = opened
        # The log names what changed since the saved state where that state is of this history and not
        # newer than ``exact`` (another process may have saved a later one): else every row is compared.
        since = Revision(key.library_id, state.generation, state.stamp) if state.generation <= key.generation else None
        rows, removed, replaced, node_rows = _fresh_rows(exact, labels, sigs, since, changed_since)
        changed = state.changed_since_build + removed + len(rows)
        if changed <= REBUILD_FRACTION * max(len(ids), 1):
            half_name = state.half if save else ""
            # Appended to the tail while it stays short; else the index file is written whole, with no tail.
            appending = save and state.tail_entries + len(rows) <= kind.tail_entries
            if appending:
                tail_name = state.tail or (secrets.token_hex(4) if len(rows) else "")
                tail_entries = state.tail_entries + len(rows)
            tail_at = files.tail(tail_name) if tail_name else None
            with (
                _appender(files.half(half_name) if half_name else None, state.nodes, dim * 2) as half,
                _appender(tail_at, state.tail_entries, _tail_record(dim).itemsize) as tail,
            ):
                sigs = np.concatenate([sigs, _add(index, matrix, rows, half, (tail, ids[rows]) if tail else None)])
            labels = np.concatenate([labels, ids[rows]])
            node_rows = np.concatenate([node_rows, rows])
            log(f"ann index: +{len(rows) - replaced} -{removed} vectors ({replaced} replaced)")
        else:
            opened = None
    if opened is None:
        log(f"ann index: building {kind.name(dim)} over {len(ids)} vectors")
        index, labels, changed = kind.new(dim, matrix), ids.copy(), 0
        node_rows = np.arange(len(ids), dtype=np.int64)
        # A new name: the copy the saved state points to stays whole until the new state replaces it.
        half_name = secrets.token_hex(4) if save and kind.keeps_half_copy(len(ids)) else ""
        with _appender(files.half(half_name) if half_name else None, 0, dim * 2) as half:
            sigs = _add(index, matrix, half=half)
    if not save:
        return AnnIndex(exact, index, labels, kind, node_rows=node_rows)
    if not appending:
        _write_whole(files, index, labels, sigs)
    saved = AnnState(key.generation, dtype, dim, len(ids), int(index.ntotal), changed, half_name, key.stamp,
                     tail_name, tail_entries)  # fmt: skip
    atomic_write_text(files.state, json.dumps(asdict(saved)) + "\n")
    files.remove_others(half_name, tail_name)
    half_copy = _open_half(files.half(half_name), saved.nodes, dim) if half_name else None
    return AnnIndex(exact, index, labels, kind, half_copy, node_rows)


def _write_whole(files: _Files, index: Any, labels: np.ndarray, sigs: np.ndarray) -> None:
    """The index file with its labels and signatures, each replaced whole (a reader sees old or new)."""
    with atomic_path(files.index) as tmp:
        try:
            _faiss().write_index(index, str(tmp))
        except RuntimeError as e:  # faiss reports a failed write (a full disk) as its own error
            raise OSError(f"faiss could not write {files.index.name}: {str(e).strip().splitlines()[-1]}") from e
    for target, array in ((files.labels, labels), (files.signatures, sigs)):
        with atomic_path(target) as tmp, tmp.open("wb") as fh:
            np.save(fh, array)


def _fresh_rows(
    exact: ExactIndex,
    labels: np.ndarray,
    sigs: np.ndarray,
    since: Revision | None,
    changed_since: ChangedSince | None,
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """What an update of the saved index (of revision ``since``) adds: (the rows of ``exact``
    whose vector it lacks, ascending; how many photos it has entries of that are gone; how many of those
    rows replace an entry; each entry's row).

    A row is fresh when no entry has its key, or when its newest entry's signature differs (re-embedded).
    Only the rows of the files the change log names are compared, where there is a log (at 10M photos,
    comparing every row reads all 20 GB of vectors); without one, every row is."""
    ids = exact.ids
    node_rows = _entry_rows(ids, labels)
    present = node_rows >= 0
    newest = np.full(len(ids), -1, np.int64)  # the newest entry of each row: older ones are dead
    np.maximum.at(newest, node_rows[present], np.flatnonzero(present))
    known = newest >= 0
    named = changed_since(since, int(REBUILD_FRACTION * len(ids)) + 1) if changed_since and since else None
    if named is None:
        compared = np.flatnonzero(known)
        current = signatures(exact.matrix)[compared]
        removed = len(np.unique(labels[~present]))  # every photo gone since the build, again each time
    else:
        compared = rows_of_files(ids, named)
        compared = compared[known[compared]]
        current = signatures(exact.matrix[compared])
        removed = len(np.intersect1d(labels[~present], named))
    fresh = ~known
    fresh[compared] = np.abs(sigs[newest[compared]] - current) > SIGNATURE_TOLERANCE
    rows = np.flatnonzero(fresh)
    return rows, removed, len(rows) - int((~known).sum()), node_rows


def _entry_rows(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Index entry -> row of its file in ``ids`` (sorted), -1 where the photo is gone."""
    if not len(ids):
        return np.full(len(labels), -1, np.int64)
    at = np.minimum(np.searchsorted(ids, labels), len(ids) - 1)
    return np.where(ids[at] == labels, at, -1)


def _chosen(dtype: AnnDtype | None, state: AnnState | None, rows: int) -> AnnDtype:
    """The index kind for ``rows`` vectors: the one asked for, else the one saved, else the size's default."""
    if dtype is not None:
        return dtype
    if state is not None and state.dtype in ANN_DTYPES:
        return state.dtype  # type: ignore[return-value]
    return "pq" if rows >= PQ_DEFAULT_ROWS else DEFAULT_ANN_DTYPE


def describe_ann(folder: Path, key: Revision, model_id: int, dtype: AnnDtype | None, rows: int) -> str:
    """The saved index in words, without opening it: what ``index status`` prints."""
    files = _paths(folder, key.library_id, model_id)
    state = _read_state(files.state)
    dtype = _chosen(dtype, state, rows)
    if state is None or not files.index.is_file() or state.dtype != dtype:
        return f"{index_kind(dtype).name()}, not built yet: the next query or `index add` builds it"
    fresh = "current" if state.reflects(key) else "updated at the next query"
    size = files.index.stat().st_size / 2**20
    described = f"{index_kind(state.dtype).name(state.dim)}: {state.count} vectors, {size:.0f} MiB, {fresh}"
    if state.half and not files.half(state.half).is_file():
        described += "; its float16 copy is missing: rebuilt at the next query"
    elif state.half:
        described += f"; candidates ranked from a float16 copy ({state.nodes * state.dim * 2 / 2**20:.0f} MiB)"
    if state.tail_entries:
        described += f"; {state.tail_entries} entries appended since it was written whole"
    return described + "; exact re-rank"
