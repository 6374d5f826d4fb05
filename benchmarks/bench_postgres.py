"""The shared library in Postgres (pgvector HNSW) beside the SQLite library, on the same vectors.

The vectors are `bench_ann`'s synthetic clustered 512-d unit vectors (CLIP-like neighbourhoods), in ten
folders of equal size. Both libraries get them through their real code: the SQLite library by
`interchange.import_vectors` (what `clipworks index import` runs; embedding excluded, it is the same for
both), Postgres by `postgres.push_library` (what `clipworks index push` runs: read the SQLite library,
digest, COPY into the HNSW-indexed table, one transaction per 2,000 files). Then, one query at a time as a
search box sends them: p50/p95 latency of `Library.search_vector` (exact: one matrix product, the
library's answer below 100,000 photos) and `PostgresLibrary.search_vector` (HNSW, and a sequential scan),
unfiltered and with a folder filter passing a tenth of the photos, and recall@10 against the exact top 10.

The Postgres server is pgserver's (Postgres 16, pgvector 0.6.2) in .bench/pgdata, on a Unix socket,
started and stopped by this script, with its default settings (shared_buffers 128 MB) except
maintenance_work_mem (``--maintenance-mb``), where the HNSW build keeps its graph.

    python benchmarks/bench_postgres.py --rows 100000
    python benchmarks/bench_postgres.py --rows 1000000 --queries 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable

import numpy as np

from bench_ann import DIM, exact_top10, make_vectors, queries
from clipworks.library import Library, make_filters, postgres
from clipworks.library.interchange import import_vectors
from clipworks.library.postgres import PostgresLibrary, push_library
from clipworks.library.store import Store
from clipworks.outputs import write_embeddings
from common import WORK, machine

FOLDERS = 10


def latencies(search: Callable[[np.ndarray], list], qs: np.ndarray) -> tuple[list[list], float, float]:
    search(qs[0])  # warm: connections, caches, the first plan
    out, times = [], []
    for q in qs:
        t = time.perf_counter()
        out.append(search(q))
        times.append((time.perf_counter() - t) * 1000)
    return out, float(np.percentile(times, 50)), float(np.percentile(times, 95))


def recall(hits: list[list], truth: np.ndarray, paths: list[str]) -> float:
    found = sum(len({h.path for h in got} & {paths[i] for i in want}) for got, want in zip(hits, truth, strict=True))
    return found / truth.size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", default="100,400,1000", help="HNSW candidate lists to measure.")
    parser.add_argument("--maintenance-mb", type=int, default=3000, help="Postgres maintenance_work_mem.")
    parser.add_argument("--query-cosine", type=float, default=0.3, help="How near the queries lie to the library.")
    parser.add_argument("--m", type=int, default=postgres.HNSW_M, help="HNSW links per node.")
    parser.add_argument("--ef-construction", type=int, default=postgres.HNSW_EF_CONSTRUCTION)
    args = parser.parse_args()
    postgres.HNSW_M, postgres.HNSW_EF_CONSTRUCTION = args.m, args.ef_construction
    WORK.mkdir(exist_ok=True)
    print(machine())
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    results: dict[str, object] = {"rows": args.rows, "machine": machine(), "m": args.m,
                                  "ef_construction": args.ef_construction}  # fmt: skip
    print(f"HNSW m {args.m}, ef_construction {args.ef_construction}", flush=True)

    matrix = make_vectors(args.rows)
    qs = queries(args.queries, matrix, args.query_cosine)
    truth, _ = exact_top10(matrix, qs, f"cosine {args.query_cosine}")
    paths = [f"/bench/f{i % FOLDERS}/{i:08d}.jpg" for i in range(args.rows)]

    # -- the SQLite library ----------------------------------------------------------------------------
    folder = WORK / f"pg-{args.rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    npy = folder / "vectors.npy"
    write_embeddings(npy, paths, np.asarray(matrix, np.float32))
    db = folder / "lib.db"
    t = time.perf_counter()
    with Store(db) as store:
        import_vectors(store, store.ensure_model("synthetic-512", "synthetic-512-0", DIM, None), npy)
    sqlite_s = time.perf_counter() - t
    results["sqlite_insert_per_s"] = args.rows / sqlite_s
    print(f"SQLite library: {args.rows:,} vectors imported in {sqlite_s:.1f} s ({args.rows / sqlite_s:,.0f}/s)")

    # -- Postgres ----------------------------------------------------------------------------------------
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    pgdata = WORK / "pgdata"
    shutil.rmtree(pgdata, ignore_errors=True)
    pgdata.mkdir()
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    try:
        url = server.get_uri()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            # The HNSW build keeps its graph in maintenance_work_mem (default 64 MB): ~2.6 KB a 512-d vector.
            conn.execute(f"ALTER SYSTEM SET maintenance_work_mem = '{args.maintenance_mb}MB'")
            conn.execute("SELECT pg_reload_conf()")
        lib = Library(db, ann="off")
        t = time.perf_counter()
        report = push_library(lib.store, url, on_chunk=lambda n: print(f"    {n:>10,} pushed", flush=True)
                              if n % 20_000 == 0 else None)  # fmt: skip
        push_s = time.perf_counter() - t
        results["push_per_s"] = args.rows / push_s
        results["hnsw_build_s"] = report.index_s
        print(f"Postgres: {report.summary()} in {push_s:.1f} s ({args.rows / push_s:,.0f}/s)", flush=True)
        with PostgresLibrary(url) as shared:
            size = shared.store.conn.execute(
                f"SELECT pg_relation_size('vectors_m{shared.model_row.id}_hnsw'), "
                f"pg_total_relation_size('vectors_m{shared.model_row.id}')"
            ).fetchone()
            results["hnsw_mb"], results["table_mb"] = size[0] / 2**20, size[1] / 2**20
            print(f"HNSW index {size[0] / 2**20:,.0f} MiB; table with its indexes {size[1] / 2**20:,.0f} MiB")
            tenth = make_filters(folder="/bench/f3")
            exact_pg = PostgresLibrary(url, exact=True)
            beams = [int(b) for b in args.ef_search.split(",")]
            by_beam = {b: PostgresLibrary(url, ef_search=b) for b in beams}
            runs = {
                "sqlite exact": lambda q: lib.search_vector(q, top_k=10),
                **{f"postgres hnsw, ef_search {b}": by_beam[b].search_vector for b in beams},
                "postgres sequential scan": lambda q: exact_pg.search_vector(q, top_k=10),
                "sqlite exact, folder filter (1/10)": lambda q: lib.search_vector(q, top_k=10, filters=tenth),
                "postgres, folder filter (1/10)": lambda q: shared.search_vector(q, top_k=10, filters=tenth),
            }
            wanted = {name: len(qs) if "sequential" not in name else min(len(qs), 20) for name in runs}
            tenth_truth = None
            for name, search in runs.items():
                hits, p50, p95 = latencies(search, qs[: wanted[name]])
                if "filter" in name:
                    if tenth_truth is None:
                        tenth_truth = hits  # the SQLite library's exact answer comes first
                    found = sum(len({h.path for h in a} & {h.path for h in b}) for a, b in
                                zip(hits, tenth_truth, strict=True))  # fmt: skip
                    rec = found / (10 * len(hits))
                else:
                    rec = recall(hits, truth[: len(hits)], paths)
                results[name] = {"p50_ms": p50, "p95_ms": p95, "recall10": rec, "queries": len(hits)}
                print(f"{name:>36}: p50 {p50:7.2f} ms, p95 {p95:7.2f} ms, recall@10 {rec:.3f} ({len(hits)} queries)",
                      flush=True)  # fmt: skip
            exact_pg.close()
            for other in by_beam.values():
                other.close()
        lib.close()
    finally:
        server.cleanup()
    print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    (WORK / f"bench_postgres-{args.rows}-m{args.m}-efc{args.ef_construction}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
