"""Approximate search at scale: faiss HNSW (what clipworks uses) against usearch HNSW and an exact scan.

Synthetic clustered unit vectors (512-d, like CLIP embeddings: neighbourhoods around many centres) are
generated in blocks, so 10M fit the machine: the exact matrix is a memory-mapped float16 file on disk.
For each engine: build time, index memory, p50/p95 query latency (one query at a time, as a search box
sends them; text encoding excluded) and recall@10 against the exact top 10 of the same float32 scores.

    python benchmarks/bench_ann.py --rows 1000000            # about 15 min on 2 cores
    python benchmarks/bench_ann.py --rows 100000 --engines faiss,usearch

usearch is optional here (pip install usearch); clipworks itself depends on faiss-cpu only.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import numpy as np

from clipworks.library import ann
from common import WORK, machine

DIM = 512


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


def queries(count: int, matrix: np.memmap, seed: int = 1) -> np.ndarray:
    """Perturbed library vectors: a query lands in a real neighbourhood, as a text query's vector does."""
    rng = np.random.default_rng(seed)
    base = np.asarray(matrix[rng.integers(0, len(matrix), count)], np.float32)
    q = base + 0.3 * rng.standard_normal(base.shape, dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top10(matrix: np.memmap, qs: np.ndarray, block: int = 500_000) -> tuple[np.ndarray, float]:
    best_s = np.full((len(qs), 10), -np.inf, np.float32)
    best_i = np.zeros((len(qs), 10), np.int64)
    for start in range(0, len(matrix), block):
        scores = np.asarray(matrix[start : start + block], np.float32) @ qs.T  # (block, Q)
        top = np.argpartition(-scores, 9, axis=0)[:10].T  # (Q, 10)
        s = np.take_along_axis(scores.T, top, axis=1)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-all_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    # One exact query's latency, scanning the float16 matrix as a library without ANN would (one core's worth).
    t = time.perf_counter()
    for start in range(0, len(matrix), block):
        np.asarray(matrix[start : start + block], np.float32) @ qs[0]
    return best_i, (time.perf_counter() - t) * 1000


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_faiss(matrix: np.memmap, dtype: str):  # type: ignore[no-untyped-def]
    import faiss

    graph = ann._new_graph(DIM, dtype, np.asarray(matrix[:: max(1, len(matrix) // 100_000)], np.float32))
    ann._add(graph, matrix)
    return graph, lambda q, k: graph.search(q.reshape(1, -1), k)[1][0], faiss.serialize_index(graph).nbytes


def build_usearch(matrix: np.memmap, dtype: str):  # type: ignore[no-untyped-def]
    from usearch.index import Index

    graph = Index(ndim=DIM, metric="ip", dtype=dtype, connectivity=ann.CONNECTIVITY,
                  expansion_add=ann.EXPANSION_ADD, expansion_search=ann.EXPANSION_SEARCH)  # fmt: skip
    for start in range(0, len(matrix), 100_000):
        part = np.asarray(matrix[start : start + 100_000], np.float32)
        graph.add(np.arange(start, start + len(part)), part, threads=0)
    return graph, lambda q, k: np.asarray(graph.search(q, k).keys), graph.memory_usage


def run(engine: str, matrix: np.memmap, qs: np.ndarray, truth: np.ndarray, dtype: str, oversample: int) -> None:
    gc.collect()
    before = rss_mb()
    t = time.perf_counter()
    _graph, search, size = (build_faiss if engine == "faiss" else build_usearch)(matrix, dtype)
    build_s = time.perf_counter() - t
    latencies, found = [], 0
    for q, want in zip(qs, truth, strict=True):
        t = time.perf_counter()
        candidates = search(q, max(10 * oversample, ann.MIN_CANDIDATES))
        # Exact re-ranking of the candidates from the full-precision matrix, as the library does.
        candidates = np.sort(candidates[candidates >= 0])
        scores = np.asarray(matrix[candidates], np.float32) @ q
        top = candidates[np.argsort(-scores)[:10]]
        latencies.append((time.perf_counter() - t) * 1000)
        found += len(set(top.tolist()) & set(want.tolist()))
    lat = np.array(latencies[10:])  # the first queries page the graph in
    grown = rss_mb() - before
    print(f"{engine:8s} {dtype:4s} build {build_s:7.1f} s  index {size / 2**20:7.0f} MiB (peak RSS +{grown:.0f} MiB)"
          f"  p50 {np.percentile(lat, 50):6.2f} ms  p95 {np.percentile(lat, 95):6.2f} ms  "
          f"recall@10 {found / (10 * len(qs)):.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--engines", default="faiss,usearch")
    parser.add_argument("--dtype", default="f16", choices=["f32", "f16", "i8"])
    parser.add_argument("--oversample", type=int, default=4)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    print(machine())
    t = time.perf_counter()
    matrix = make_vectors(args.rows)
    qs = queries(args.queries, matrix)
    print(f"{args.rows} x {DIM} clustered unit vectors ready in {time.perf_counter() - t:.0f} s")
    truth, exact_ms = exact_top10(matrix, qs)
    print(f"exact scan: {exact_ms:.1f} ms for one query over {args.rows} float16 rows (single thread)")
    for engine in args.engines.split(","):
        try:
            run(engine, matrix, qs, truth, args.dtype, args.oversample)
        except ImportError as e:
            print(f"{engine}: not installed ({e.name})")


if __name__ == "__main__":
    main()
