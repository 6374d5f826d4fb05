"""Approximate search at scale: faiss HNSW (what clipworks uses) against usearch HNSW and an exact scan.

Synthetic clustered unit vectors (512-d, like CLIP embeddings: neighbourhoods around many centres) are
generated in blocks, so 10M fit the machine: the exact matrix is a memory-mapped float16 file on disk.
For each engine: build time and rate, index memory, and for each search setting (the walk's beam,
efSearch, and how many candidates it hands to the exact re-ranking) p50/p95 query latency (one query at
a time, as a search box sends them; text encoding excluded) and recall@10 against the exact top 10 of the
same float32 scores. ``faiss-ivfpq`` (coarse lists + 64-byte product codes) is the engine that fits 10M
vectors in a few GB; HNSW keeps every vector in the graph (10M x 512 x f16 = 10 GB before its links).

    python benchmarks/bench_ann.py --rows 1000000            # HNSW: ~20 min a build on 2 idle cores
    python benchmarks/bench_ann.py --rows 1000000 --build-seconds 360  # measure a part, extrapolate
    python benchmarks/bench_ann.py --rows 100000 --engines faiss,usearch
    python benchmarks/bench_ann.py --rows 10000000 --engines faiss-ivfpq --settings 32:256,64:256

usearch is optional here (pip install usearch); clipworks itself depends on faiss-cpu only.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.library import ann
from clipworks.library.search import ExactIndex
from common import WORK, machine

DIM = 512
Search = Callable[[np.ndarray, int], np.ndarray]  # (query, candidates) -> row numbers (-1: none)


def make_vectors(rows: int, seed: int = 0, clusters: int = 2000, block: int = 200_000) -> np.memmap:
    path = WORK / f"ann-{rows}-{seed}.f16"
    matrix = np.memmap(path, dtype=np.float16, mode="r+" if path.exists() else "w+", shape=(rows, DIM))
    marker = path.with_suffix(".done")
    if not marker.exists():
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
        for start in range(0, rows, block):
            n = min(block, rows - start)
            part = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, DIM), dtype=np.float32)
            matrix[start : start + n] = part / np.linalg.norm(part, axis=1, keepdims=True)
        matrix.flush()
        marker.touch()
    return matrix


def queries(count: int, matrix: np.memmap, cosine: float, seed: int = 1) -> np.ndarray:
    """Library vectors moved by isotropic noise until their cosine to it is about ``cosine``: 0.3 is as far
    as a CLIP text prompt lies from its matching photos (the hard case for a graph walk: the query is far
    from every node), 0.8 an image query ("more like this")."""
    rng = np.random.default_rng(seed)
    base = np.asarray(matrix[rng.integers(0, len(matrix), count)], np.float32)
    sigma = np.sqrt((1 / cosine**2 - 1) / DIM)  # |noise|^2 = sigma^2 DIM against |base| = 1
    q = base + sigma * rng.standard_normal(base.shape, dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top10(matrix: np.memmap, qs: np.ndarray, name: str, block: int = 250_000) -> tuple[np.ndarray, float]:
    cache = WORK / f"{Path(matrix.filename).stem}-first{len(matrix)}-truth-{name}-{len(qs)}.npy"
    if cache.exists():  # measured when it was made
        return np.load(cache), float("nan")
    best_s = np.full((len(qs), 10), -np.inf, np.float32)
    best_i = np.zeros((len(qs), 10), np.int64)
    for start in range(0, len(matrix), block):
        scores = np.asarray(matrix[start : start + block], np.float32) @ qs.T  # (block, Q)
        top = np.argpartition(-scores, 9, axis=0)[:10].T  # (Q, 10)
        s = np.take_along_axis(scores.T, top, axis=1)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-all_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    np.save(cache, best_i)
    # One exact query's latency, scanning the float16 matrix as a library without ANN would (one core's worth).
    t = time.perf_counter()
    for start in range(0, len(matrix), block):
        np.asarray(matrix[start : start + block], np.float32) @ qs[0]
    return best_i, (time.perf_counter() - t) * 1000


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_in_blocks(add: Callable[[int, np.ndarray], None], matrix: np.memmap, block: int, limit_s: float) -> int:
    """Adds ``matrix`` a block at a time; stops after ``limit_s`` seconds (HNSW builds slowly on a loaded
    machine) and returns how many rows went in, so the rate can be measured on a part."""
    t, added = time.perf_counter(), 0
    while added < len(matrix) and time.perf_counter() - t < limit_s:
        add(added, np.ascontiguousarray(matrix[added : added + block], np.float32))
        added = min(added + block, len(matrix))
        print(f"    {added:>10,} added, {added / (time.perf_counter() - t):,.0f}/s, load {os.getloadavg()[0]:.1f}",
              flush=True)  # fmt: skip
    return added


def saved_size(index: Any) -> int:
    """Bytes of the index as faiss writes it (what the library keeps beside the database), via a file:
    ``serialize_index`` would hold a second copy in memory."""
    import faiss

    path = WORK / "ann-size.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


Built = tuple[Search, Callable[[int], None], int, Any, int]  # search, set beam, bytes, index, rows added


def build_faiss(matrix: np.memmap, dtype: str, limit_s: float) -> Built:
    """The library's own graph (``ann.HnswKind``): same M, efConstruction and scalar quantiser."""

    graph = ann.HnswKind(dtype).new(DIM, matrix)
    added = add_in_blocks(lambda _start, part: graph.add(part), matrix, 10_000, limit_s)

    def set_beam(ef: int) -> None:
        graph.hnsw.efSearch = ef

    return lambda q, n: graph.search(q.reshape(1, -1), n)[1][0], set_beam, saved_size(graph), graph, added


def build_usearch(matrix: np.memmap, dtype: str, limit_s: float) -> Built:
    from usearch.index import Index

    graph = Index(ndim=DIM, metric="ip", dtype=dtype, connectivity=ann.CONNECTIVITY,
                  expansion_add=ann.EXPANSION_ADD, expansion_search=ann.EXPANSION_SEARCH)  # fmt: skip
    added = add_in_blocks(lambda start, part: graph.add(np.arange(start, start + len(part)), part, threads=0),
                          matrix, 10_000, limit_s)  # fmt: skip

    def set_beam(ef: int) -> None:
        graph.expansion_search = ef

    return lambda q, n: np.asarray(graph.search(q, n).keys), set_beam, graph.memory_usage, graph, added


def build_ivfpq(matrix: np.memmap, _dtype: str, limit_s: float) -> Built:
    """The library's ``--ann-dtype pq`` (``ann.IvfPqKind``): k-means lists (1,024, or 4,096 from 2M vectors)
    holding 64-byte product codes, ~70 bytes a vector, fast adds."""
    import faiss

    saved = WORK / f"{Path(matrix.filename).stem}-first{len(matrix)}-ivfpq.faiss"
    if saved.exists() and limit_s == float("inf"):  # built by an earlier run on the same vectors
        index = faiss.read_index(str(saved))
        print(f"    read the index an earlier run built ({saved.name}); its build is not timed here", flush=True)
        added = index.ntotal
    else:
        t = time.perf_counter()
        index = ann.IvfPqKind().new(DIM, matrix)
        print(f"    {index.nlist} lists and codebooks trained in {time.perf_counter() - t:.0f} s", flush=True)
        added = add_in_blocks(lambda _start, part: index.add(part), matrix, 250_000, limit_s)
        if added == len(matrix):
            with atomic_path(saved) as tmp:
                faiss.write_index(index, str(tmp))

    def set_beam(nprobe: int) -> None:
        index.nprobe = nprobe

    return lambda q, n: index.search(q.reshape(1, -1), n)[1][0], set_beam, saved_size(index), index, added


ENGINES = {"faiss": build_faiss, "usearch": build_usearch, "faiss-ivfpq": build_ivfpq}
HNSW_SETTINGS = "64:64,128:64,128:128,256:128,256:256,512:256"
SETTINGS = {"faiss": HNSW_SETTINGS, "usearch": HNSW_SETTINGS, "faiss-ivfpq": "8:128,16:256,32:256,64:512,128:512"}


def measure(search: Search, matrix: np.memmap, qs: np.ndarray, truth: np.ndarray, candidates: int) -> tuple[float, ...]:
    latencies, found = [], 0
    for q, want in zip(qs, truth, strict=True):
        t = time.perf_counter()
        rows = search(q, candidates)
        # Exact re-ranking of the candidates from the full-precision matrix, as the library does.
        rows = np.sort(rows[rows >= 0])
        scores = np.asarray(matrix[rows], np.float32) @ q
        top = rows[np.argsort(-scores)[:10]]
        latencies.append((time.perf_counter() - t) * 1000)
        found += len(set(top.tolist()) & set(want.tolist()))
    lat = np.array(latencies[10:])  # the first queries page the graph in
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95)), found / (10 * len(qs))


def float32_copy(matrix: np.memmap, block: int = 250_000) -> np.memmap:
    path = Path(matrix.filename).with_suffix(f".first{len(matrix)}.f32")
    if not path.exists():
        with atomic_path(path) as tmp:
            copy = np.memmap(tmp, dtype=np.float32, mode="w+", shape=matrix.shape)
            for start in range(0, len(matrix), block):
                copy[start : start + block] = matrix[start : start + block]
            copy.flush()
            del copy
    return np.memmap(path, dtype=np.float32, mode="r", shape=matrix.shape)


def page_in(path: Path, drop: np.memmap, block: int = 64 * 2**20) -> float:
    """Read ``path`` so the page cache holds it, as a server's file is after many queries, first dropping
    ``drop`` (the file the search reads least: the benchmark's float16 matrix, which a library without
    the copy does not have, or the float32 side file, of which the copy's search reads 64 rows a query)
    from this process and from the cache. Read twice: pages read once sit on the kernel's inactive list,
    which the next file read evicts first, and a server's hot file is on the active one. Returns the
    seconds of the first read."""
    import mmap

    drop._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]  # pages still mapped are not evicted
    with Path(drop.filename).open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    seconds = 0.0
    for _ in range(2):
        t = time.perf_counter()
        with path.open("rb") as fh:
            while fh.read(block):
                pass
        seconds = seconds or time.perf_counter() - t
    return seconds


def library_path(
    engine: str, index: Any, matrix: np.memmap, qs: np.ndarray, truth: np.ndarray, resident: bool = False
) -> None:
    """The same index through ``AnnIndex.top_k`` at the library's defaults (its own candidates and beam),
    re-ranking from a float32 copy of the matrix, as the library's side file holds its vectors. Where the
    library's index keeps a float16 copy of its entries (IVF-PQ over millions), the benchmark's own float16
    matrix is that copy (entry i = row i, as in a fresh build), and the search is also timed without it.
    ``resident``: what each search reads for every candidate paged in first (the float16 copy where there
    is one, with the float32 side file dropped from the cache: its 64 rows a query come from disk; else
    the float32 side file, with the float16 matrix dropped)."""
    kind = ann.IvfPqKind() if engine == "faiss-ivfpq" else ann.HnswKind("f16")
    kind.prepare(index)
    rows = np.arange(len(matrix), dtype=np.int64)
    side = float32_copy(matrix)
    for half in [matrix, None] if kind.keeps_half_copy(index.ntotal) else [None]:
        if resident:
            paged, drop = (matrix, side) if half is not None else (side, matrix)
            seconds = page_in(Path(paged.filename), drop=drop)
            print(f"  {Path(paged.filename).name} paged in ({paged.nbytes / 2**30:.1f} GiB in {seconds:.0f} s), "
                  f"{Path(drop.filename).name} dropped from the page cache", flush=True)  # fmt: skip
        searcher = ann.AnnIndex(ExactIndex(rows, side), index, rows, kind, half)
        wanted = kind.candidates(10, 0, index.ntotal)
        latencies, alone, found = [], [], 0
        for q, want in zip(qs, truth, strict=True):
            t = time.perf_counter()
            ids, _ = searcher.top_k(q, 10)
            latencies.append((time.perf_counter() - t) * 1000)
            found += len(set(ids.tolist()) & set(want.tolist()))
            t = time.perf_counter()  # the same faiss search again, alone: what the re-ranking adds is the rest
            index.search(q.reshape(1, -1), wanted)
            alone.append((time.perf_counter() - t) * 1000)
        lat = np.array(latencies[10:])
        final = max(10 * ann.OVERSAMPLE, ann.MIN_CANDIDATES)
        ranked = f"ranked from the float16 copy, {final} re-scored from float32" if half is not None else (
            "all re-scored from float32")  # fmt: skip
        print(f"  AnnIndex.top_k at the library defaults ({kind.name(DIM)}, {wanted} candidates {ranked}): "
              f"p50 {np.percentile(lat, 50):.2f} ms  p95 {np.percentile(lat, 95):.2f} ms  "
              f"recall@10 {found / (10 * len(qs)):.3f}; the faiss search alone p50 "
              f"{np.percentile(alone[10:], 50):.2f} ms", flush=True)  # fmt: skip


def cpu_s() -> float:
    return sum(os.times()[:2])  # user + system time of all this process' threads


QuerySets = dict[str, np.ndarray]


def run(engine: str, matrix: np.memmap, qsets: QuerySets, dtype: str, settings: str, limit_s: float,
        resident: bool = False) -> None:  # fmt: skip
    gc.collect()
    before = rss_mb()
    print(f"{engine} ({dtype}): building over {len(matrix):,} vectors, load {os.getloadavg()[0]:.1f}", flush=True)
    t, c = time.perf_counter(), cpu_s()
    search, set_beam, size, graph, added = ENGINES[engine](matrix, dtype, limit_s)
    build_s, build_cpu = time.perf_counter() - t, cpu_s() - c
    grown = rss_mb() - before
    # Under load the wall-clock rate says little; CPU seconds per vector are what an idle machine would spend.
    print(f"{engine:11s} {dtype:4s} build {build_s:7.1f} s ({added / build_s:,.0f} vectors/s; CPU {build_cpu:,.0f} s, "
          f"{added / build_cpu:,.0f} vectors per CPU-second)  index {size / 2**20:,.0f} MiB (peak RSS +{grown:,.0f} "
          f"MiB)  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    if added < len(matrix):
        # Extrapolation, not a measurement: an HNSW insert costs about log(n), so the rest goes slower still.
        growth = np.log(len(matrix)) / np.log(added)
        idle_min = len(matrix) / (added / build_cpu) * growth / os.cpu_count() / 60  # type: ignore[operator]
        print(f"  stopped after {limit_s:.0f} s at {added:,} of {len(matrix):,} vectors; EXTRAPOLATED: index "
              f"{size / added * len(matrix) / 2**20:,.0f} MiB, full build {idle_min:,.0f} min on {os.cpu_count()} idle "
              f"cores (CPU rate x log n growth {growth:.2f}); the queries below search the {added:,} added "
              f"(recall against their exact top 10)", flush=True)  # fmt: skip
        matrix = matrix[:added]
    for name, qs in qsets.items():
        truth, _ = exact_top10(matrix, qs, name)
        print(f"  queries at {name} to a library vector:")
        for setting in filter(None, settings.split(",")):
            beam, candidates = (int(x) for x in setting.split(":"))
            set_beam(beam)
            p50, p95, recall = measure(search, matrix, qs, truth, candidates)
            knob = "nprobe" if engine == "faiss-ivfpq" else "efSearch"
            print(f"    {knob} {beam:4d} candidates {candidates:4d}: p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  "
                  f"recall@10 {recall:.3f}  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        if engine in ("faiss", "faiss-ivfpq"):
            library_path(engine, graph, matrix, qs, truth, resident)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--engines", default="faiss,usearch")
    parser.add_argument("--dtype", default="f16", choices=["f32", "f16", "i8"])
    parser.add_argument("--settings", help="Comma-separated beam:candidates pairs (beam = efSearch, or nprobe for "
                        "IVF; default: SETTINGS for each engine).")  # fmt: skip
    parser.add_argument("--build-seconds", type=float, default=float("inf"),
                        help="Stop adding after this long; measure the part built, extrapolate the rest.")  # fmt: skip
    parser.add_argument("--query-cosines", default="0.3,0.8", help="How near each query set lies to the library.")
    parser.add_argument("--resident", action="store_true", help="Before the library's own search, page its float32 "
                        "side file in and drop the float16 matrix from the cache (a server's steady state; at 10M "
                        "the two do not both fit in 24 GB). --settings '' then skips the float16 rows.")  # fmt: skip
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    print(machine())
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    t = time.perf_counter()
    matrix = make_vectors(args.rows)
    qsets = {f"cosine {c}": queries(args.queries, matrix, float(c)) for c in args.query_cosines.split(",")}
    print(f"{args.rows:,} x {DIM} clustered unit vectors ready in {time.perf_counter() - t:.0f} s", flush=True)
    for name, qs in qsets.items():
        t = time.perf_counter()
        _, exact_ms = exact_top10(matrix, qs, name)
        print(f"exact top 10 of {len(qs)} queries at {name} in {time.perf_counter() - t:.0f} s; one exact query: "
              f"{exact_ms:.1f} ms over {args.rows:,} float16 rows (single thread)", flush=True)  # fmt: skip
    for engine in args.engines.split(","):
        try:
            settings = SETTINGS[engine] if args.settings is None else args.settings
            run(engine, matrix, qsets, args.dtype, settings, args.build_seconds, args.resident)
        except ImportError as e:
            print(f"{engine}: not installed ({e.name})")
        gc.collect()


if __name__ == "__main__":
    main()
