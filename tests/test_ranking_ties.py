"""Tied scores are ranked by key at the cut as within it, so the best k are always the first k of the best
k + 1 and pages read at growing offsets never repeat or skip a hit. A photo and its copy embedded in one
batch score alike to the last bit: the gallery once showed the copy on two pages and the original on none,
because argpartition keeps an arbitrary one of the scores tied at its cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipworks import ops
from clipworks.library import Library
from clipworks.library.search import ExactIndex
from library_helpers import library_of_dim


def few_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scores of six values only: almost every cut falls inside a tie."""
    return (rng.integers(0, 6, n) / 5).astype(np.float32)


@pytest.mark.parametrize("keyed", [False, True], ids=["by position", "by key"])
def test_top_k_is_the_start_of_the_whole_ranking_for_every_k(keyed: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        scores = few_values(rng, 300)
        keys = rng.permutation(10_000)[:300] if keyed else None
        whole = np.lexsort((keys if keyed else np.arange(300), -scores))
        for k in range(1, 301, 7):
            order, values = ops.top_k(scores, k, keys)
            np.testing.assert_array_equal(order, whole[:k], err_msg=f"k={k}")
            np.testing.assert_array_equal(values, scores[whole[:k]])


def test_a_tie_of_excluded_rows_at_the_cut_goes_by_position() -> None:
    scores = np.array([-np.inf, 0.5, -np.inf, 0.5, -np.inf], np.float32)
    assert ops.top_k(scores, 3)[0].tolist() == [1, 3, 0]
    assert ops.top_k(scores, 4)[0].tolist() == [1, 3, 0, 2]


def test_exact_search_pages_of_tied_photos_partition_the_ranking(tmp_path: Path) -> None:
    """Groups of four photos with one vector (bit for bit), searched a page at a time at every page size."""
    rng = np.random.default_rng(1)
    distinct = rng.standard_normal((8, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    order = rng.permutation(32)  # the files of a group are not next to each other
    db = tmp_path / "ties.db"
    library_of_dim(db, [f"/p/{i:02d}.jpg" for i in range(32)], 16, vectors=distinct[order % 8])
    query = distinct[:3].sum(axis=0)
    with Library(db, ann="off") as lib:
        whole = lib.ranked(query, top_k=32)
        assert len({key for key, _ in whole}) == 32
        scores = [score for _, score in whole]
        assert scores == sorted(scores, reverse=True)
        for size in (1, 2, 3, 4, 5, 7):
            pages = [lib.ranked(query, top_k=size, offset=at) for at in range(0, 32, size)]
            assert [hit for page in pages for hit in page] == whole, size
        index = lib.vectors()
        assert isinstance(index, ExactIndex)
        keys = [int(key) for key in index.top_k(query, 32)[0]]
        tied = [keys[i : i + 4] for i in range(0, 32, 4)]
        assert all(group == sorted(group) for group in tied)  # within a tie: ascending key
