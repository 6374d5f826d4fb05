"""Approximate search: recall against exact, exact scores, incremental updates, rebuilds, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.library import Library
from clipworks.library import ann as ann_module
from clipworks.library.ann import (
    EXPANSION_SEARCH,
    PQ_PROBES,
    REBUILD_FRACTION,
    AnnIndex,
    HnswKind,
    IvfPqKind,
    describe_ann,
    sync_ann,
)
from clipworks.library.search import ExactIndex
from clipworks.library.store import Revision
from clipworks.ops import l2_normalize
from library_helpers import make_variants

DIM = 32
KEY = Revision(0x1234, 1, 11)
KINDS = ["f16", "pq"]  # an HNSW graph, and IVF-PQ's lists of product codes


def clustered(n: int, seed: int = 0, clusters: int = 40, dim: int = DIM) -> np.ndarray:
    """Unit vectors around random centres: neighbourhoods as real embeddings have them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    rows = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return l2_normalize(rows.astype(np.float32))


def exact_of(ids: np.ndarray, matrix: np.ndarray) -> ExactIndex:
    order = np.argsort(ids)
    return ExactIndex(ids[order].astype(np.int64), np.ascontiguousarray(matrix[order]))


@pytest.fixture(scope="module")
def base() -> ExactIndex:
    return exact_of(np.arange(10, 2010, dtype=np.int64) * 3, clustered(2000))


def recall_at_10(ann: AnnIndex, exact: ExactIndex, queries: np.ndarray) -> float:
    found = 0
    for q in queries:
        want = set(exact.top_k(q, 10)[0].tolist())
        found += len(want & set(ann.top_k(q, 10)[0].tolist()))
    return found / (10 * len(queries))


@pytest.mark.parametrize("dtype", KINDS)
def test_recall_and_scores_are_exact_cosines(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    ann = sync_ann(tmp_path, KEY, 1, base, dtype)
    queries = clustered(50, seed=1)
    assert recall_at_10(ann, base, queries) >= 0.95
    for q in queries[:10]:
        ids, scores = ann.top_k(q, 10)
        rows = np.searchsorted(base.ids, ids)
        np.testing.assert_allclose(scores, base.matrix[rows] @ q, rtol=0, atol=1e-6)
        assert np.all(np.diff(scores) <= 0)


def test_recall_with_the_default_beam_on_clip_sized_vectors(tmp_path: Path) -> None:
    """512-d vectors in 1,500 small clusters and queries far from every vector (cosine 0.15 to the nearest,
    farther than a CLIP text prompt lies from its photos): the hard case for a graph walk. The default
    beam must still find 95% of the exact top 10 (at efSearch 64 it finds 93.7%, at 128 98.7%)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((1500, 512))
    matrix = l2_normalize(
        (centres[rng.integers(0, 1500, 3000)] + 0.6 * rng.standard_normal((3000, 512))).astype(np.float32)
    )
    exact = exact_of(np.arange(3000, dtype=np.int64), matrix)
    sigma = np.sqrt((1 / 0.15**2 - 1) / 512)
    queries = l2_normalize(
        (matrix[rng.integers(0, 3000, 60)] + sigma * rng.standard_normal((60, 512))).astype(np.float32)
    )
    assert recall_at_10(sync_ann(tmp_path, KEY, 1, exact, "f16"), exact, queries) >= 0.95


def test_product_codes_probe_a_few_lists_and_still_find_the_top_10(tmp_path: Path) -> None:
    """30,000 vectors: IVF-PQ's k-means makes 512 lists (about 4 sqrt(n)), a query scans the codes of only 64
    of them, and the exact re-ranking of its 512 candidates must still find 95% of the exact top 10, for
    queries as far from the library as a text prompt lies from its photos (cosine 0.3)."""
    rng = np.random.default_rng(3)
    matrix = clustered(30_000, seed=3, clusters=300, dim=64)
    exact = exact_of(np.arange(30_000, dtype=np.int64), matrix)
    sigma = np.sqrt((1 / 0.3**2 - 1) / 64)
    queries = l2_normalize(
        (matrix[rng.integers(0, 30_000, 60)] + sigma * rng.standard_normal((60, 64))).astype(np.float32)
    )
    ann = sync_ann(tmp_path, KEY, 1, exact, "pq")
    assert ann.index.nlist == 512 and ann.index.nprobe == PQ_PROBES
    assert ann.index.code_size == 8  # a byte per 8 dimensions
    assert recall_at_10(ann, exact, queries) >= 0.95
    ids, scores = ann.top_k(queries[0], 10)
    np.testing.assert_allclose(scores, exact.matrix[np.searchsorted(exact.ids, ids)] @ queries[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", KINDS)
def test_a_filter_passing_many_photos_is_applied_inside_the_search(
    tmp_path: Path, base: ExactIndex, dtype: str
) -> None:
    """Half the photos allowed (above the fraction answered by an exact scan of just them): every hit is an
    allowed photo, and the allowed top 10 are found as an exact scan of them finds them."""
    ann = sync_ann(tmp_path, KEY, 1, base, dtype)
    allowed = np.arange(0, len(base), 2)
    found = 0
    for q in clustered(20, seed=8):
        ids, _ = ann.top_k(q, 10, rows=allowed)
        assert set(ids.tolist()) <= set(base.ids[allowed].tolist())
        found += len(set(ids.tolist()) & set(base.top_k(q, 10, rows=allowed)[0].tolist()))
    assert found / 200 >= 0.95


@pytest.mark.parametrize("dtype", ["i8", "pq"])
def test_threshold_and_exclude(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    ann = sync_ann(tmp_path, KEY, 1, base, dtype)
    q = base.matrix[5]
    ids, _ = ann.top_k(q, 5)
    assert ids[0] == base.ids[5]
    ids_excl, _ = ann.top_k(q, 5, exclude=[int(base.ids[5])])
    assert int(base.ids[5]) not in ids_excl.tolist()
    _, scores = ann.top_k(q, 50, threshold=0.8)
    assert len(scores) and scores.min() >= 0.8


@pytest.mark.parametrize("dtype", KINDS)
def test_saved_index_is_reopened_not_rebuilt(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    logs: list[str] = []
    sync_ann(tmp_path, KEY, 1, base, dtype, logs.append)
    assert any("building" in m for m in logs)
    logs.clear()
    again = sync_ann(tmp_path, KEY, 1, base, dtype, logs.append)
    assert logs == [] and len(again) == len(base)
    if dtype == "pq":  # today's search settings, not the ones saved in the file
        assert again.index.nprobe == min(PQ_PROBES, again.index.nlist)
    else:
        assert again.index.hnsw.efSearch == EXPANSION_SEARCH
    state = json.loads(next(tmp_path.glob("*.faiss.json")).read_text())
    assert state["generation"] == KEY.generation and state["count"] == len(base)


@pytest.mark.parametrize("dtype", KINDS)
def test_update_in_place_adds_removes_and_replaces(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, dtype)
    ids, matrix = base.ids.copy(), np.array(base.matrix)
    removed = ids[:100]
    changed_id = int(ids[200])
    new_vector = l2_normalize(np.random.default_rng(7).standard_normal(DIM).astype(np.float32))
    matrix[200] = new_vector
    added_ids = np.arange(100_000, 100_150, dtype=np.int64)
    new = exact_of(np.concatenate([ids[100:], added_ids]), np.concatenate([matrix[100:], clustered(150, seed=3)]))
    logs: list[str] = []
    ann = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, new, dtype, logs.append)
    assert logs == ["ann index: +150 -100 vectors (1 replaced)"]
    assert ann.index.ntotal == len(base) + 151  # dead nodes stay until a rebuild; re-ranking skips them
    for q in base.matrix[:100]:  # the removed photos' own vectors never bring them back
        assert not set(ann.top_k(q, 20)[0].tolist()) & set(removed.tolist())
    assert ann.top_k(new_vector, 1)[0][0] == changed_id
    assert ann.top_k(new.matrix[-1], 1)[0][0] == added_ids[-1]
    assert recall_at_10(ann, new, clustered(30, seed=4)) >= 0.95


def changed_by(exact: ExactIndex, seed: int, added: int = 40, removed: int = 5) -> tuple[ExactIndex, np.ndarray]:
    """``exact`` with its first ``removed`` photos gone, one re-embedded and ``added`` new ones: (it, the
    re-embedded photo's new vector)."""
    ids, matrix = exact.ids.copy(), np.array(exact.matrix)
    moved = l2_normalize(np.random.default_rng(seed).standard_normal(DIM).astype(np.float32))
    matrix[removed + 1] = moved
    new_ids = np.arange(added, dtype=np.int64) + 1_000_000 * seed
    return exact_of(np.concatenate([ids[removed:], new_ids]),
                    np.concatenate([matrix[removed:], clustered(added, seed=seed)])), moved  # fmt: skip


def saved_state(folder: Path) -> dict:
    return json.loads(next(folder.glob("*.faiss.json")).read_text())


@pytest.mark.parametrize("dtype", KINDS)
def test_a_small_update_is_appended_to_a_tail_and_the_index_file_is_not_written(
    tmp_path: Path, base: ExactIndex, dtype: str
) -> None:
    """faiss writes an index only whole (695 MiB at 10M photos): a few added entries go to the tail file,
    and whoever opens the index adds them again, to the same answers."""
    sync_ann(tmp_path, KEY, 1, base, dtype)
    index_file = next(tmp_path.glob("*.faiss"))
    written = {f.name: f.read_bytes() for f in (index_file, *tmp_path.glob("*.npy"))}
    current = base
    for generation in (2, 3):
        moved_id = int(current.ids[6])  # changed_by re-embeds the photo after the 5 it removes
        current, moved = changed_by(current, seed=generation)
        updated = sync_ann(tmp_path, Revision(KEY[0], generation, 10 + generation), 1, current, dtype)
        assert {f.name: f.read_bytes() for f in (index_file, *tmp_path.glob("*.npy"))} == written
        state, (tail,) = saved_state(tmp_path), tmp_path.glob("*.tail")
        assert state["tail_entries"] == 41 * (generation - 1) and state["nodes"] == len(base) + state["tail_entries"]
        assert tail.name.endswith(f".{state['tail']}.tail")
        said = describe_ann(tmp_path, Revision(KEY[0], generation, 10 + generation), 1, dtype, len(current))
        assert f"; {state['tail_entries']} entries appended since it was written whole" in said
        # label, signature, vector; the bytes an update killed before its state left past the end are cut
        assert tail.stat().st_size == state["tail_entries"] * (8 + 4 + 4 * DIM)
        with tail.open("ab") as fh:  # what an update killed before its state was written leaves past the end
            fh.write(b"\x7f" * 999)
        reopened = sync_ann(tmp_path, Revision(KEY[0], generation, 10 + generation), 1, current, dtype)
        assert reopened.index.ntotal == updated.index.ntotal and reopened is not updated
        np.testing.assert_array_equal(reopened.labels, updated.labels)
        assert reopened.top_k(moved, 1)[0][0] == updated.top_k(moved, 1)[0][0] == moved_id
        assert reopened.top_k(current.matrix[-1], 1)[0][0] == current.ids[-1]
        queries = clustered(30, seed=20 + generation)
        assert recall_at_10(reopened, current, queries) >= 0.95
        if dtype == "pq":  # the same codes in the same lists: the very same candidates
            for q in queries:
                np.testing.assert_array_equal(reopened.top_k(q, 10)[0], updated.top_k(q, 10)[0])


@pytest.mark.parametrize("dtype", KINDS)
def test_photos_only_removed_write_no_index_file_and_no_tail(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, dtype)
    index_file = next(tmp_path.glob("*.faiss"))
    first = index_file.read_bytes()
    fewer = exact_of(base.ids[50:], np.array(base.matrix[50:]))
    sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, fewer, dtype)
    assert index_file.read_bytes() == first and list(tmp_path.glob("*.tail")) == []
    state = saved_state(tmp_path)
    assert (state["generation"], state["count"], state["tail_entries"]) == (2, len(fewer), 0)
    logs: list[str] = []
    reopened = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, fewer, dtype, logs.append)
    assert logs == [] and not set(reopened.top_k(base.matrix[0], 20)[0].tolist()) & set(base.ids[:50].tolist())


def test_a_tail_past_its_limit_is_folded_into_the_index_file(
    tmp_path: Path, base: ExactIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(IvfPqKind, "tail_entries", 60)
    sync_ann(tmp_path, KEY, 1, base, "pq")
    index_file = next(tmp_path.glob("*.faiss"))
    first = index_file.read_bytes()
    once, _ = changed_by(base, seed=2)
    sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, once, "pq")
    assert index_file.read_bytes() == first and saved_state(tmp_path)["tail_entries"] == 41
    twice, moved = changed_by(once, seed=3)  # 82 entries would be past the 60
    updated = sync_ann(tmp_path, Revision(KEY[0], 3, 13), 1, twice, "pq")
    state = saved_state(tmp_path)
    assert index_file.read_bytes() != first and (state["tail"], state["tail_entries"]) == ("", 0)
    assert list(tmp_path.glob("*.tail")) == [] and state["nodes"] == len(base) + 82
    logs: list[str] = []
    reopened = sync_ann(tmp_path, Revision(KEY[0], 3, 13), 1, twice, "pq", logs.append)
    assert logs == [] and reopened.index.ntotal == updated.index.ntotal
    assert reopened.top_k(moved, 1)[0][0] == updated.top_k(moved, 1)[0][0]


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_damaged_tail_rebuilds_the_index(tmp_path: Path, base: ExactIndex, damage: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, "pq")
    once, _ = changed_by(base, seed=2)
    sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, once, "pq")
    (tail,) = tmp_path.glob("*.tail")
    if damage == "missing":
        tail.unlink()
    else:
        tail.write_bytes(tail.read_bytes()[:-10])
    logs: list[str] = []
    ann = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, once, "pq", logs.append)
    assert any("building" in m for m in logs)
    assert recall_at_10(ann, once, clustered(20, seed=5)) >= 0.95
    assert (saved_state(tmp_path)["tail_entries"], list(tmp_path.glob("*.tail"))) == (0, [])


@pytest.mark.parametrize("dtype", KINDS)
def test_drift_past_the_limit_rebuilds(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, dtype)
    keep = int(len(base) * (1 - REBUILD_FRACTION)) - 10
    smaller = exact_of(base.ids[:keep], np.array(base.matrix[:keep]))
    logs: list[str] = []
    sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, smaller, dtype, logs.append)
    assert any("building" in m for m in logs)


@pytest.mark.parametrize("dtype", KINDS)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "state-only"])
def test_damaged_or_missing_index_is_rebuilt(tmp_path: Path, base: ExactIndex, damage: str, dtype: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, dtype)
    graph = next(tmp_path.glob("*.faiss"))
    if damage == "garbage":
        graph.write_bytes(b"not an index" * 100)
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:1000])
    else:
        graph.unlink()
    logs: list[str] = []
    ann = sync_ann(tmp_path, KEY, 1, base, dtype, logs.append)
    assert any("building" in m for m in logs)
    assert recall_at_10(ann, base, clustered(20, seed=5)) >= 0.95


def test_without_a_dtype_the_saved_index_is_kept_and_a_new_one_is_f16(tmp_path: Path, base: ExactIndex) -> None:
    logs: list[str] = []
    assert describe_ann(tmp_path / "a", KEY, 1, None, len(base)).startswith("HNSW (f16), not built yet")
    assert isinstance(sync_ann(tmp_path / "a", KEY, 1, base, None, logs.append).kind, HnswKind)
    assert logs == [f"ann index: building HNSW (f16) over {len(base)} vectors"]
    sync_ann(tmp_path / "b", KEY, 1, base, "pq")
    logs.clear()
    kept = sync_ann(tmp_path / "b", KEY, 1, base, None, logs.append)
    assert logs == [] and isinstance(kept.kind, IvfPqKind)
    assert describe_ann(tmp_path / "b", KEY, 1, None, len(base)).startswith("IVF-PQ (4-byte codes): 2000 vectors")
    assert describe_ann(tmp_path / "b", KEY, 1, "i8", len(base)).startswith("HNSW (i8), not built yet")


def test_a_new_index_over_many_photos_is_product_codes_and_a_saved_graph_stays(
    tmp_path: Path, base: ExactIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rule is by size (a million photos in use); the fixture's 2,000 vectors stand in for them.
    sync_ann(tmp_path / "graph", KEY, 1, base, None)
    monkeypatch.setattr(ann_module, "PQ_DEFAULT_ROWS", len(base))
    assert describe_ann(tmp_path / "new", KEY, 1, None, len(base)).startswith("IVF-PQ, not built yet")
    logs: list[str] = []
    assert isinstance(sync_ann(tmp_path / "new", KEY, 1, base, None, logs.append).kind, IvfPqKind)
    assert logs == [f"ann index: building IVF-PQ (4-byte codes) over {len(base)} vectors"]
    logs.clear()
    # A graph built when the library was smaller is kept (rebuilding it is for --ann-dtype to ask).
    assert isinstance(sync_ann(tmp_path / "graph", Revision(KEY[0], 2, 12), 1, base, None, logs.append).kind, HnswKind)
    assert not any("building" in line for line in logs)
    below = ExactIndex(base.ids[:-1], base.matrix[:-1])
    assert isinstance(sync_ann(tmp_path / "small", KEY, 1, below, None).kind, HnswKind)


@pytest.mark.parametrize(("first", "then", "built"), [("f16", "i8", "HNSW (i8)"),
                                                     ("f16", "pq", "IVF-PQ (4-byte codes)"),
                                                     ("pq", "f32", "HNSW (f32)")])  # fmt: skip
def test_other_dtype_rebuilds(tmp_path: Path, base: ExactIndex, first: str, then: str, built: str) -> None:
    sync_ann(tmp_path, KEY, 1, base, first)
    logs: list[str] = []
    sync_ann(tmp_path, KEY, 1, base, then, logs.append)
    assert logs == [f"ann index: building {built} over {len(base)} vectors"]


@pytest.mark.parametrize(("dtype", "described"), [("f16", "HNSW (f16): 12 vectors"),
                                                   ("pq", "IVF-PQ ({}-byte codes): 12 vectors")])  # fmt: skip
def test_library_with_ann_on_answers_as_exact_and_says_so(
    tmp_path: Path, vit_bundle: Path, photos, capsys, dtype: str, described: str
) -> None:
    folder = tmp_path / "photos"
    make_variants(photos, folder, 12)
    db = tmp_path / "lib.db"
    ann_args = ["--ann", "on", "--ann-dtype", dtype]
    code = main(["index", "add", str(folder), "--db", str(db), "--model", str(vit_bundle), *ann_args])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    (state,) = (tmp_path / "lib.db-vectors").glob("*.faiss.json")  # `index add` built it
    assert json.loads(state.read_text())["dtype"] == dtype
    # Later commands without --ann-dtype answer from the index the library has: they do not rebuild it.
    with Library(db, ann="off") as exact_lib, Library(db, ann="on") as ann_lib:
        searcher = ann_lib.searcher()
        assert isinstance(searcher, AnnIndex) and searcher.index.ntotal == 12
        assert json.loads(state.read_text())["dtype"] == dtype
        for query in ("a dog", "a red building at night"):
            assert ann_lib.search(query, top_k=5) == exact_lib.search(query, top_k=5)
        dim = exact_lib.searcher().matrix.shape[1]
    assert main(["index", "status", "--db", str(db), "--ann", "on", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["search_index"].startswith(described.format(dim // 8))
    assert main(["index", "status", "--db", str(db)]) == 0
    assert "search index: exact (below 100000 photos)" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "bad"), [(["--ann", "maybe"], "maybe"), (["--ann-dtype", "f8"], "f8")])
def test_bad_ann_options_are_one_line(tmp_path: Path, capsys, args: list[str], bad: str) -> None:
    code = main(["search", "dog", "--db", str(tmp_path / "none.db"), *args])
    err = capsys.readouterr().err
    assert code == 2 and bad in err and len(err.strip().splitlines()) == 1


def half_copy_of(tmp_path: Path) -> tuple[dict, Path]:
    state = json.loads(next(tmp_path.glob("*.faiss.json")).read_text())
    (copy,) = tmp_path.glob("*.f16")
    assert copy.name.endswith(f".{state['half']}.f16")
    return state, copy


@pytest.fixture
def half_copies(monkeypatch: pytest.MonkeyPatch, base: ExactIndex) -> None:
    # The rule is by size (3M photos); from 1,000 here, so the fixture's 2,000 vectors and a library of
    # fewer than those that is rebuilt have copies.
    monkeypatch.setattr(ann_module, "PQ_HALF_COPY_ENTRIES", len(base) // 2)


def test_a_large_pq_index_ranks_its_candidates_from_a_float16_copy(
    tmp_path: Path, base: ExactIndex, half_copies: None
) -> None:
    ann = sync_ann(tmp_path, KEY, 1, base, "pq")
    state, copy = half_copy_of(tmp_path)
    assert state["half"] and copy.stat().st_size == len(base) * DIM * 2
    np.testing.assert_array_equal(np.asarray(ann.half), np.asarray(base.matrix, np.float16))  # entry order = ids
    queries = clustered(50, seed=1)
    assert recall_at_10(ann, base, queries) >= 0.95
    for q in queries[:10]:  # the scores shown are still float32 cosines, not the copy's
        ids, scores = ann.top_k(q, 10)
        np.testing.assert_allclose(scores, base.matrix[np.searchsorted(base.ids, ids)] @ q, rtol=0, atol=1e-6)
    # The copy decides which candidates reach the exact re-ranking: a row turned away from the query there
    # is not re-scored, though its float32 vector is the query itself.
    q = np.asarray(base.matrix[5])
    assert ann.top_k(q, 5)[0][0] == base.ids[5]
    ann.half = np.array(ann.half)
    ann.half[5] = -ann.half[5]
    assert base.ids[5] not in ann.top_k(q, 5)[0].tolist()
    assert "candidates ranked from a float16 copy (0 MiB)" in describe_ann(tmp_path, KEY, 1, None, len(base))


@pytest.mark.parametrize("dtype", KINDS)
def test_below_the_size_or_in_a_graph_there_is_no_float16_copy(tmp_path: Path, base: ExactIndex, dtype: str) -> None:
    ann = sync_ann(tmp_path, KEY, 1, base, dtype)
    assert ann.half is None and not list(tmp_path.glob("*.f16"))
    assert json.loads(next(tmp_path.glob("*.faiss.json")).read_text())["half"] == ""


def test_the_float16_copy_grows_in_place_and_a_rebuild_replaces_it(
    tmp_path: Path, base: ExactIndex, half_copies: None
) -> None:
    sync_ann(tmp_path, KEY, 1, base, "pq")
    first, copy = half_copy_of(tmp_path)
    with copy.open("ab") as fh:  # what an update killed before its state was written leaves past the end
        fh.write(b"\x7f" * 1000)
    ids, matrix = base.ids.copy(), np.array(base.matrix)
    new_vector = l2_normalize(np.random.default_rng(7).standard_normal(DIM).astype(np.float32))
    matrix[200] = new_vector
    added = clustered(150, seed=3)
    new = exact_of(np.concatenate([ids[100:], np.arange(100_000, 100_150)]), np.concatenate([matrix[100:], added]))
    ann = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, new, "pq")
    state, same = half_copy_of(tmp_path)
    assert same == copy and state["half"] == first["half"] and state["nodes"] == len(base) + 151
    assert copy.stat().st_size == state["nodes"] * DIM * 2  # the leftover bytes were cut
    appended = np.asarray(ann.half[len(base) :], np.float32)
    np.testing.assert_array_equal(appended[0], new_vector.astype(np.float16))  # the replaced photo's new vector
    np.testing.assert_array_equal(appended[1:], added.astype(np.float16))
    assert ann.top_k(new_vector, 1)[0][0] == ids[200]
    assert recall_at_10(ann, new, clustered(30, seed=4)) >= 0.95
    keep = int(len(new) * (1 - REBUILD_FRACTION)) - 10
    sync_ann(tmp_path, Revision(KEY[0], 3, 13), 1, exact_of(new.ids[:keep], np.array(new.matrix[:keep])), "pq")
    rebuilt, replacement = half_copy_of(tmp_path)  # the old copy is gone: only one file matches
    assert rebuilt["half"] != first["half"] and replacement.stat().st_size == keep * DIM * 2


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_damaged_float16_copy_rebuilds_the_index(
    tmp_path: Path, base: ExactIndex, half_copies: None, damage: str
) -> None:
    sync_ann(tmp_path, KEY, 1, base, "pq")
    _, copy = half_copy_of(tmp_path)
    if damage == "missing":
        copy.unlink()
    else:
        copy.write_bytes(copy.read_bytes()[:-DIM])
    logs: list[str] = []
    ann = sync_ann(tmp_path, KEY, 1, base, "pq", logs.append)
    assert any("building" in m for m in logs)
    assert recall_at_10(ann, base, clustered(20, seed=5)) >= 0.95
    assert half_copy_of(tmp_path)[1].stat().st_size == len(base) * DIM * 2


def test_a_state_written_before_float16_copies_is_read(tmp_path: Path, base: ExactIndex) -> None:
    sync_ann(tmp_path, KEY, 1, base, "pq")
    state_file = next(tmp_path.glob("*.faiss.json"))
    state = json.loads(state_file.read_text())
    del state["half"]
    state_file.write_text(json.dumps(state))
    logs: list[str] = []
    assert sync_ann(tmp_path, KEY, 1, base, None, logs.append).half is None and logs == []


def test_one_process_at_a_time_updates_the_index(tmp_path: Path, base: ExactIndex) -> None:
    """An update waits for the lock beside the index (flock: another process, or another open here)."""
    import threading

    from clipworks.atomic import held_lock

    sync_ann(tmp_path, KEY, 1, base, "pq")
    logs: list[str] = []
    done = threading.Event()
    lock = next(tmp_path.glob("*.lock"))
    with held_lock(lock):
        worker = threading.Thread(
            target=lambda: (sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, base, "pq", logs.append), done.set())
        )
        worker.start()
        assert not done.wait(1.0)
        assert logs == [f"ann index: waiting for pid {os.getpid()} to finish updating it"]
    worker.join(30)
    assert done.is_set() and logs[-1] == "ann index: +0 -0 vectors (0 replaced)"
    current = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, base, "pq", logs.append)
    assert current and len(logs) == 2  # current: no lock taken


def test_a_rebuild_killed_before_its_state_leaves_no_mismatched_copy(
    tmp_path: Path, base: ExactIndex, half_copies: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild replaces the index files, then writes its state: killed between the two, the old state names
    the old build's copy beside the new build's entries (as many, other vectors). That pairing is found out
    by the entries' signatures and rebuilt, not searched."""
    sync_ann(tmp_path, KEY, 1, base, "pq")
    other = exact_of(base.ids + 1, clustered(len(base), seed=11))  # the same count, other photos
    killed = RuntimeError("killed before the state was written")

    def kill(*_args: object) -> None:
        raise killed

    monkeypatch.setattr(ann_module, "atomic_write_text", kill)
    with pytest.raises(RuntimeError, match="killed"):
        sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, other, "pq")  # past the drift limit: a rebuild
    monkeypatch.undo()
    monkeypatch.setattr(ann_module, "PQ_HALF_COPY_ENTRIES", len(base) // 2)
    logs: list[str] = []
    ann = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, other, "pq", logs.append)
    assert any("building" in m for m in logs)
    assert recall_at_10(ann, other, clustered(30, seed=12)) >= 0.95


def test_entries_of_re_embedded_or_excluded_photos_do_not_crowd_out_the_rest(
    tmp_path: Path, base: ExactIndex, half_copies: None
) -> None:
    """The 60 photos nearest a query re-embedded in place (each now has an old and a new entry), then the
    query with those 60 excluded: the float16 ranking must still hand the next 10 to the exact re-ranking."""
    sync_ann(tmp_path, KEY, 1, base, "pq")
    q = np.asarray(base.matrix[7])
    nearest = base.top_k(q, 60)[0]
    matrix = np.array(base.matrix)
    rows = np.searchsorted(base.ids, nearest)
    matrix[rows] = l2_normalize(matrix[rows] + 0.05 * np.random.default_rng(2).standard_normal((60, DIM)))
    moved = ExactIndex(base.ids, matrix.astype(np.float32))
    logs: list[str] = []
    ann = sync_ann(tmp_path, Revision(KEY[0], 2, 12), 1, moved, "pq", logs.append)
    assert logs == ["ann index: +0 -0 vectors (60 replaced)"]
    want = moved.top_k(q, 10, exclude=nearest.tolist())
    got = ann.top_k(q, 10, exclude=nearest.tolist())
    assert len(got[0]) == 10 and len(set(got[0].tolist()) & set(want[0].tolist())) >= 9


def test_a_process_that_waited_for_the_lock_keeps_the_index_the_other_built(
    tmp_path: Path, base: ExactIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --ann-dtype the kind follows the saved index: chosen again after the wait, not before it."""
    import threading

    from clipworks.atomic import held_lock

    monkeypatch.setattr(ann_module, "PQ_DEFAULT_ROWS", len(base))  # with no index yet: IVF-PQ
    files = ann_module._paths(tmp_path, KEY[0], 1)
    tmp_path.mkdir(exist_ok=True)
    logs: list[str] = []
    with held_lock(files.index.with_suffix(".lock")):
        waiter = threading.Thread(target=sync_ann, args=(tmp_path, KEY, 1, base, None, logs.append))
        waiter.start()
        while not logs:
            waiter.join(0.05)
        ann_module._update(files, KEY, base, "f16", lambda _m: None)  # the holder builds a graph meanwhile
    waiter.join(30)
    assert not waiter.is_alive() and not any("building" in m for m in logs)
    assert json.loads(files.state.read_text())["dtype"] == "f16"


def test_status_says_when_the_float16_copy_is_missing(tmp_path: Path, base: ExactIndex, half_copies: None) -> None:
    sync_ann(tmp_path, KEY, 1, base, "pq")
    half_copy_of(tmp_path)[1].unlink()
    assert "float16 copy is missing: rebuilt at the next query" in describe_ann(tmp_path, KEY, 1, None, len(base))


@pytest.mark.parametrize("dim", [512, 100, 3])  # rows of 2 KB, of 400 bytes (across pages), of 12 bytes
def test_scattered_rows_of_a_side_file_are_its_rows(tmp_path: Path, dim: int) -> None:
    """The page hints before a gather stay inside the mapping (madvise refuses a range past it) whatever the
    .npy header's length and the row size, and the rows read are the file's."""
    from clipworks.library.search import HINTED_ROWS, scattered_rows

    matrix = np.random.default_rng(dim).standard_normal((5000, dim)).astype(np.float32)
    np.save(tmp_path / "m.npy", matrix)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    rows = np.array([0, 1, 7, 2047, 2048, 4999])
    np.testing.assert_array_equal(scattered_rows(mapped, rows), matrix[rows])
    everything = np.arange(0, 5000, 5000 // HINTED_ROWS)[:HINTED_ROWS]
    np.testing.assert_array_equal(scattered_rows(mapped, everything), matrix[everything])
    np.testing.assert_array_equal(scattered_rows(mapped[100:], rows[:-1]), matrix[100:][rows[:-1]])  # a slice
    np.testing.assert_array_equal(scattered_rows(matrix, rows), matrix[rows])  # in memory
