"""The first search after a small change to a large library: what `index add` of a few photos costs.

A library of ``--rows`` synthetic clustered 512-d vectors (`bench_ann`'s) is imported through the real code
(`interchange.import_vectors`, what `clipworks index import` runs), searched once so that its side file and
approximate index exist, and then changed ``--rounds`` times by a small batch: ``--change`` new photos
imported, as many re-embedded (new vectors at known paths) and as many marked gone, each in its own write
transaction as `index add` makes them. After each change the time to the first answer is measured, split
into the side file (`Library.vectors`), the approximate index (`Library.searcher`) and the query, then the
time to bring the filters' arrays up to date (`Library.facets`: what the first filtered search or gallery
page after the change waits for), then what another process's first search costs (it opens the saved side
file and index, and adds the index's tail of entries appended since it was written whole), and the answer
is checked against an exact scan of the current vectors read straight from SQLite.

    python benchmarks/bench_library_update.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from bench_ann import DIM, make_vectors, queries
from clipworks.library import Library
from clipworks.library.interchange import import_vectors
from clipworks.library.store import TEXT_ARG, Store, to_bytes
from clipworks.outputs import write_embeddings
from common import WORK, machine


def import_rows(db, paths: list[str], matrix: np.ndarray, folder) -> None:
    npy = folder / "batch.npy"
    write_embeddings(npy, paths, np.asarray(matrix, np.float32))
    with Store(db) as store:
        (model,) = store.models() or [store.ensure_model("synthetic-512", "synthetic-512-0", DIM, None)]
        import_vectors(store, model, npy)
    npy.unlink()


def exact_answer(db, query: np.ndarray) -> list[str]:
    """The top 10 paths by a scan of the vectors as SQLite holds them now (no side file, no index)."""
    with Library(db, ann="off", side_file=False) as plain:
        return [h.path for h in plain.search_vector(query, top_k=10)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--change", type=int, default=100, help="Photos added, re-embedded and removed per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ann", default="auto", help="The library's --ann (auto: IVF-PQ from 1M photos).")
    args = parser.parse_args()
    print(machine())
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    folder = WORK / f"update-{args.rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db = folder / "lib.db"
    matrix = make_vectors(args.rows + args.rounds * args.change * 2)
    base = np.asarray(matrix[: args.rows], np.float32)
    paths = [f"/bench/{i:08d}.jpg" for i in range(args.rows)]
    t = time.perf_counter()
    import_rows(db, paths, base, folder)
    print(f"imported {args.rows:,} vectors in {time.perf_counter() - t:.1f} s", flush=True)
    del base
    query = queries(1, matrix, 0.8)[0]
    results: dict[str, object] = {"rows": args.rows, "change": args.change, "machine": machine(), "rounds": []}
    with Library(db, ann=args.ann) as library:
        t = time.perf_counter()
        library.search_vector(query, top_k=10)
        library.facets()
        first_s = time.perf_counter() - t
        print(f"first search (side file and index made): {first_s:.1f} s; {library.searcher().__class__.__name__}")
        results["first_search_s"] = first_s
        rng = np.random.default_rng(5)
        fresh = args.rows
        for round_no in range(args.rounds):
            added = [f"/bench/{i:08d}.jpg" for i in range(fresh, fresh + args.change)]
            new_vectors = np.asarray(matrix[fresh : fresh + 2 * args.change], np.float32)
            fresh += 2 * args.change
            replaced = [paths[i] for i in rng.choice(args.rows, args.change, replace=False)]
            # The query's own neighbourhood changes too: re-embedded photos take vectors next to the query.
            new_vectors[args.change :] = query + 0.02 * rng.standard_normal((args.change, DIM)).astype(np.float32)
            import_rows(db, added + replaced, new_vectors, folder)
            gone = rng.choice(args.rows, args.change, replace=False).tolist()
            with Store(db) as store, store.write() as conn:
                conn.executemany(
                    f"UPDATE files SET deleted_at = ? WHERE path = {TEXT_ARG}",
                    [(time.time(), to_bytes(paths[i])) for i in gone],
                )
            t = time.perf_counter()
            library.vectors()
            side_s = time.perf_counter() - t
            library.searcher()
            ann_s = time.perf_counter() - t - side_s
            hits = [h.path for h in library.search_vector(query, top_k=10)]
            total_s = time.perf_counter() - t
            t = time.perf_counter()
            library.facets()  # what the first filtered search or gallery page reads after the change
            facets_s = time.perf_counter() - t
            # What another process (the next `clipworks search`) pays: it opens the saved side file and index.
            t = time.perf_counter()
            with Library(db, ann=args.ann) as other:
                other_hits = [h.path for h in other.search_vector(query, top_k=10)]
            other_s = time.perf_counter() - t
            same = hits == other_hits == exact_answer(db, query)
            row = {"side_file_s": side_s, "ann_s": ann_s, "first_answer_s": total_s, "filter_arrays_s": facets_s,
                   "other_process_s": other_s, "same_as_exact": same}  # fmt: skip
            print(f"round {round_no}: +{args.change} added, {args.change} re-embedded, {args.change} removed: "
                  f"side file {side_s:.2f} s, index {ann_s:.2f} s, first answer {total_s:.2f} s; "
                  f"filter arrays {facets_s:.2f} s; another process's first answer {other_s:.2f} s; "
                  f"answer {'equals' if same else 'DIFFERS FROM'} the exact scan", flush=True)  # fmt: skip
            results["rounds"].append(row)  # type: ignore[union-attr]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
