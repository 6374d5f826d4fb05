"""The photo library: incremental indexing, scanning rules, schema, search exactness, CLI."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.decoders import describe_fast
from clipworks.errors import ClipworksError, UsageError
from clipworks.library import SCHEMA_VERSION, Library
from clipworks.library.scan import image_extensions, walk
from clipworks.library.search import Term, combine_terms, parse_query, query_texts
from clipworks.library.store import Store
from clipworks.runtime.encoder import ClipModel
from library_helpers import file_ids, library_of_dim, make_variants, stored_vectors


@pytest.fixture
def folder(tmp_path: Path, photos: list[Path]) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for p in photos:
        shutil.copy(p, root / p.name)
    make_variants(photos, root / "more", 6)
    return root


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the image encoder decodes, to prove which files were (not) re-embedded."""
    seen: list[str] = []
    original = ClipModel.preprocess

    def spy(self, image, mode=None):  # type: ignore[no-untyped-def]
        seen.append(str(image))
        return original(self, image, mode)

    monkeypatch.setattr(ClipModel, "preprocess", spy)
    return seen


def test_incremental_rename_delete_add_corrupt(tmp_path: Path, folder: Path, vit_bundle: Path, photos, decoded):
    db = tmp_path / "lib.db"
    lib = Library(db, str(vit_bundle), create=True)
    first = lib.index([folder], batch_size=4)
    n = len(photos) + 6
    assert (first.new, first.embedded, first.failed) == (n, n, 0)
    before = stored_vectors(db)
    ids_before = file_ids(db)
    assert len(before) == n

    renamed_from, renamed_to = folder / photos[0].name, folder / "sub" / "renamed.jpg"
    renamed_to.parent.mkdir()
    renamed_from.rename(renamed_to)
    deleted = folder / photos[1].name
    deleted.unlink()
    added = make_variants(photos[2:3], tmp_path / "new", 1, size=200, fmt="png")[0]
    added = Path(shutil.move(added, folder / "added.png"))
    corrupt = folder / "more" / "v000.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")

    decoded.clear()
    second = lib.index([folder], batch_size=4)
    assert sorted(decoded) == sorted([str(added), str(corrupt)])  # nothing untouched was decoded again
    assert (second.moved, second.deleted, second.new, second.changed) == (1, 1, 1, 1)
    assert (second.embedded, second.failed) == (1, 1)

    after = stored_vectors(db)
    assert str(renamed_to) in after and str(renamed_from) not in after
    np.testing.assert_array_equal(after[str(renamed_to)], before[str(renamed_from)])  # vector reused
    assert file_ids(db)[str(renamed_to)] == ids_before[str(renamed_from)]
    assert str(deleted) not in after and str(corrupt) not in after and str(added) in after
    for path in set(before) - {str(renamed_from), str(deleted), str(corrupt)}:
        np.testing.assert_array_equal(after[path], before[path])

    status = lib.status()
    assert status.files == n  # -1 deleted, +1 added; the corrupt one is present but unreadable
    assert status.deleted == 1
    assert [p for p, _ in status.errors] == [str(corrupt)]
    assert status.models[0][1:] == (n - 1, 0)
    hits = {h.path for h in lib.search("a photo", top_k=100)}
    assert hits == set(after)

    decoded.clear()
    third = lib.index([folder], batch_size=4)
    assert decoded == [] and third.unchanged == n  # the unreadable file is not retried while unchanged

    shutil.copy(photos[3], corrupt)  # fixed: it changed, so it is tried again
    decoded.clear()
    fourth = lib.index([folder], batch_size=4)
    assert decoded == [str(corrupt)] and fourth.embedded == 1 and lib.status().errors == []


def test_copy_reuses_vector_and_moved_back_file_is_restored(tmp_path: Path, folder: Path, vit_bundle: Path, decoded):
    db = tmp_path / "lib.db"
    lib = Library(db, str(vit_bundle), create=True)
    lib.index([folder])
    source = folder / "more" / "v001.jpg"
    shutil.copy2(source, folder / "copy.jpg")
    outside = tmp_path / "outside.jpg"
    shutil.move(folder / "more" / "v002.jpg", outside)
    decoded.clear()
    report = lib.index([folder])
    assert (report.copied, report.deleted, decoded) == (1, 1, [])
    vectors = stored_vectors(db)
    np.testing.assert_array_equal(vectors[str(folder / "copy.jpg")], vectors[str(source)])
    shutil.move(outside, folder / "more" / "v002.jpg")
    report = lib.index([folder])
    assert (report.restored + report.moved, decoded) == (1, [])
    assert str(folder / "more" / "v002.jpg") in stored_vectors(db)


def test_models_keep_their_own_vectors(tmp_path: Path, folder: Path, vit_bundle: Path, rn_bundle: Path):
    db = tmp_path / "lib.db"
    Library(db, str(vit_bundle), create=True).index([folder])
    rn = Library(db, str(rn_bundle), create=True)
    n = len(list(walk(str(folder))))
    assert rn.index([folder]).embedded == n  # another model: embedded again, not mixed
    with pytest.raises(UsageError, match="several models"):
        Library(db).search("x")
    conn = sqlite3.connect(db)
    counts = dict(conn.execute("SELECT model_id, COUNT(*) FROM embeddings GROUP BY model_id").fetchall())
    assert sorted(counts.values()) == [n, n]
    assert {h.path for h in rn.search("dog", top_k=50)} == set(stored_vectors(db))


def test_search_matches_brute_force(tmp_path: Path, folder: Path, vit_bundle: Path):
    db = tmp_path / "lib.db"
    lib = Library(db, str(vit_bundle), create=True)
    lib.index([folder])
    vectors = stored_vectors(db)
    paths = list(vectors)
    matrix = np.stack([vectors[p] for p in paths])
    clip = lib.clip
    for words, images, negatives in [
        (["a", "dog"], [], []),
        (["+beach", "-people", "2:sunset"], [], ["a car"]),
        ([], [str(folder / "more" / "v003.jpg")], []),
        (["fruit"], [str(folder / "more" / "v004.jpg")], ["text"]),
    ]:
        hits = lib.search(words, images=images, negatives=negatives, top_k=7)
        # Independent query vector: encode each term, normalise, weight, sum, normalise. The example photos are
        # in the library, which indexed them with its default decode ("fast") and reuses their vectors.
        terms = parse_query(words, negatives=negatives, images=images)
        parts = [
            clip.encode_texts([t.value])[0] if t.kind == "text" else clip.encode_images([t.value], mode="fast")[0]
            for t in terms
        ]
        q = sum(t.weight * v / np.linalg.norm(v) for t, v in zip(terms, parts, strict=True))
        q = q / np.linalg.norm(q)
        scores = matrix @ q
        order = np.argsort(-scores)[:7]
        assert [h.path for h in hits] == [paths[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    cut = float(np.sort(matrix @ lib.query_vector(parse_query(["dog"])))[-3])
    assert [h.score >= cut for h in lib.search("dog", threshold=cut, top_k=100)] == [True] * 3


def test_search_sees_other_writers_and_runs_in_threads(tmp_path: Path, folder: Path, vit_bundle: Path, photos):
    db = tmp_path / "lib.db"
    writer = Library(db, str(vit_bundle), create=True)
    writer.index([folder / "more"])
    reader = Library(db)
    assert len(reader.search("x", top_k=100)) == 6
    # An open write transaction in another connection (an indexer mid-batch) does not block readers.
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("DELETE FROM embeddings")
    assert len(reader.search("x", top_k=100)) == 6
    other.execute("ROLLBACK")
    other.close()
    writer.index([folder])
    assert len(reader.search("x", top_k=100)) == len(photos) + 6  # the cached matrix follows the generation
    results: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                results.append(len(reader.search("a cat", top_k=5)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [5] * 20


def test_side_file_is_used_and_replaced(tmp_path: Path, folder: Path, vit_bundle: Path, photos):
    db = tmp_path / "lib.db"
    lib = Library(db, str(vit_bundle), create=True)
    lib.index([folder / "more"])
    expected = lib.search("x", top_k=3)
    side = tmp_path / "lib.db-vectors"
    (rows,) = side.glob("*.f32")  # the rows, and which key each holds
    assert rows.stat().st_size == 6 * lib.model_row.dim * 4 and len(list(side.glob("*.rows.npz"))) == 1
    fresh = Library(db)
    index = fresh.vectors()
    assert isinstance(index.matrix, np.memmap)  # a new process maps the side file instead of reading BLOBs
    assert fresh.search("x", top_k=3) == expected
    lib.index([folder])
    assert len(Library(db).search("x", top_k=100)) == len(photos) + 6
    assert len(list(side.glob("*.f32"))) == 1 and len(list(side.glob("*.rows.npz"))) == 1  # the stale one is gone


def test_the_side_file_is_streamed_from_the_database_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 512-d vectors (40 MB) written into the side file 2,048 rows at a time: the peak of what Python
    allocates meanwhile stays near two blocks (8 MB), not the 80 MB of all BLOBs plus the matrix (at 10M
    photos that was 40 GB on a 24 GB machine). The file holds the rows as the database orders them."""
    import tracemalloc

    from clipworks.library import store as store_module
    from clipworks.library.search import MatrixCache

    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/photos/{i:05d}.jpg" for i in range(20_000)], 512)
    monkeypatch.setattr(store_module, "LIVE_BLOCK_ROWS", 2048)
    with Store(db) as store:
        (model,) = store.models()
        want_ids, want = store.live_vectors(model)
        tracemalloc.start()
        try:
            index = MatrixCache(db, model).get(store)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
        assert isinstance(index.matrix, np.memmap) and len(want_ids) == 20_000
        np.testing.assert_array_equal(index.ids, want_ids)
        np.testing.assert_array_equal(index.matrix, want)
        reopened = MatrixCache(db, model).get(store)  # another process: the file, not the database
        np.testing.assert_array_equal(reopened.matrix, want)


def test_recreated_library_never_reads_the_old_side_file(tmp_path: Path, vit_bundle: Path, photos):
    db = tmp_path / "lib.db"
    old_photos = make_variants(photos, tmp_path / "old", 6)
    new_photos = make_variants(photos[::-1], tmp_path / "new", 6, size=200, fmt="png")
    old = Library(db, str(vit_bundle), create=True, ann="on")
    old.index([tmp_path / "old"], batch_size=4)
    old.search("x")  # writes the side file and the approximate index
    shutil.copy(old_photos[0], old_photos[0].with_name("extra" + old_photos[0].suffix))
    old.index([tmp_path / "old"], batch_size=4)
    old.search("x")  # the extra photo appended to the index's tail
    old.close()
    side = tmp_path / "lib.db-vectors"
    assert list(side.glob("*.f32")) and list(side.glob("*.faiss")) and list(side.glob("*.tail"))
    for f in tmp_path.glob("lib.db*"):  # the library deleted, its side folder left behind
        if f != side:
            f.unlink()

    new = Library(db, str(vit_bundle), create=True)
    new.index([tmp_path / "new"], batch_size=4)  # as many files and commits: the same generation
    fresh = Library(db)
    vectors = stored_vectors(db)
    assert set(vectors) == {str(p) for p in new_photos}
    query = fresh.query_vector(parse_query(["a", "photo"]))
    hits = fresh.search_vector(query, top_k=10)
    paths = list(vectors)
    scores = np.stack([vectors[p] for p in paths]) @ query
    want = [paths[i] for i in np.argsort(-scores)]
    assert [h.path for h in hits] == want  # the new photos ranked by their own vectors
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1], atol=1e-5)
    assert not {str(p) for p in old_photos} & {h.path for h in hits}
    assert len(list(side.glob("*.f32"))) == len(list(side.glob("*.rows.npz"))) == 1  # the old library's are gone
    assert not [p.name for p in side.iterdir() if p.name.endswith((".faiss", ".faiss.json", ".tail", ".npy"))]


def test_excluded_files_are_reported_as_excluded_and_come_back_without_embedding(
    tmp_path: Path, folder: Path, vit_bundle: Path, photos, decoded
):
    lib = Library(tmp_path / "lib.db", str(vit_bundle), create=True)
    lib.index([folder])
    report = lib.index([folder], excludes=["more"])
    # Excluded: out of search, the rows and vectors kept (not "deleted": the files are still there).
    assert (report.excluded, report.deleted) == (6, 0)
    assert "6 excluded" in report.summary() and "deleted" not in report.summary()
    assert not [h for h in lib.search("x", top_k=100) if "/more/" in h.path]
    assert (lib.status().excluded, lib.status().deleted) == (6, 0)
    (folder / photos[0].name).unlink()
    report = lib.index([folder])
    assert (report.excluded, report.deleted) == (0, 1)  # a file really gone is still "deleted"
    assert (lib.status().excluded, lib.status().deleted) == (6, 1)  # the remembered exclude still holds
    decoded.clear()
    report = lib.index([folder], excludes=[])
    assert (report.restored, report.embedded, decoded) == (6, 0, [])
    assert len([h for h in lib.search("x", top_k=100) if "/more/" in h.path]) == 6


def test_scan_rules(tmp_path: Path, photos: list[Path]):
    root = tmp_path / "r"
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "raw").mkdir()
    for rel in ["x.jpg", "UPPER.JPEG", "a/y.Png", "a/deep/z.webp", "a/t.tiff", "a/b.bmp", "a/g.gif",
                ".dot.jpg", ".hidden/h.jpg", "raw/r.jpg", "notes.txt", "a/skip.gif"]:  # fmt: skip
        shutil.copy(photos[0], root / rel)
    os.symlink(root, root / "a" / "loop")  # a loop back to the top
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    found = sorted(os.path.relpath(s.path, root) for s in walk(str(root), ["raw/*", "skip.gif"]))
    assert found == ["UPPER.JPEG", "a/b.bmp", "a/deep/z.webp", "a/g.gif", "a/t.tiff", "a/y.Png", "x.jpg"]
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".gif"} <= image_extensions()
    try:
        import pillow_heif  # noqa: F401

        assert ".heic" in image_extensions()
    except ImportError:
        assert ".heic" not in image_extensions()


def test_excludes_are_remembered_per_folder(tmp_path: Path, folder: Path, vit_bundle: Path, photos):
    lib = Library(tmp_path / "lib.db", str(vit_bundle), create=True)
    assert lib.index([folder], excludes=["more"]).scanned == len(photos)
    assert lib.index([folder]).scanned == len(photos)  # the stored excludes apply again
    report = lib.index([folder], excludes=[])
    assert (report.scanned, report.new) == (len(photos) + 6, 6)


def test_schema_version_migrations_and_wal(tmp_path: Path):
    db = tmp_path / "lib.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"files", "models", "embeddings", "roots", "state"} <= {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(ClipworksError, match="newer than this clipworks"):
        Store(db)
    with pytest.raises(UsageError, match="no library"):
        Library(tmp_path / "none.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(ClipworksError, match="not a usable clipworks library"):
        Store(tmp_path / "junk.db")


@pytest.mark.parametrize(
    ("words", "negatives", "images", "expected"),
    [
        (["a", "dog", "on", "grass"], [], [], [Term("text", "a dog on grass")]),
        (["beach", "-people"], [], [], [Term("text", "beach"), Term("text", "people", -1.0)]),
        (["+beach", "2:cat", "-0.5:dog"], [], [],
         [Term("text", "beach"), Term("text", "cat", 2.0), Term("text", "dog", -0.5)]),
        (["beach"], ["people"], [], [Term("text", "beach"), Term("text", "people", -1.0)]),
        ([], [], ["p.jpg"], [Term("image", "p.jpg")]),
        (["sea"], [], ["0.5:p.jpg"], [Term("text", "sea"), Term("image", "p.jpg", 0.5)]),
    ],
)  # fmt: skip
def test_parse_query(words, negatives, images, expected):
    assert parse_query(words, negatives=negatives, images=images) == expected


@pytest.mark.parametrize(
    ("words", "message"), [(["-people"], "positive term"), (["0:cat"], "weight 0"), ([], "positive")]
)
def test_parse_query_refuses(words, message):
    with pytest.raises(UsageError, match=message):
        parse_query(words)


def test_combine_terms_weights_unit_vectors_in_term_order():
    """Library.query_vector and the gallery both combine through combine_terms: text rows in term order,
    image vectors from the callback, each normalised, weighted, summed and normalised."""
    terms = [Term("text", "sea"), Term("image", "p.jpg", 0.5), Term("text", "people", -1.0)]
    assert query_texts(terms) == ["sea", "people"]
    sea, people, photo = np.array([3.0, 0, 0, 0]), np.array([0, 0, 2.0, 0]), np.array([0, 4.0, 0, 0])
    got = combine_terms(terms, np.stack([sea, people]), {"p.jpg": photo}.__getitem__)
    want = np.array([1.0, 0.5, -1.0, 0])
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(UsageError, match="cancel out"):
        combine_terms([Term("text", "a"), Term("text", "b", -1.0)], np.stack([sea, 2 * sea]), {}.__getitem__)


def test_cli_index_search_results_similar_duplicates(tmp_path: Path, folder: Path, vit_bundle: Path, photos, capsys):
    n = len(photos) + 6
    db = str(tmp_path / "lib.db")
    base = ["--db", db]
    assert main(["index", "add", str(folder), *base, "--model", str(vit_bundle), "--batch-size", "4"]) == 0
    assert f"{n} new" in capsys.readouterr().err
    assert main(["index", "status", *base, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["files"] == n and status["models"][0]["vectors"] == n and status["schema_version"] == SCHEMA_VERSION
    # Indexing decodes "fast" by default; the model row says so, with the decoders and the precision.
    assert status["models"][0]["precision"] == "fp32"
    assert status["models"][0]["decode"] == f"fast ({describe_fast()})"
    assert main(["index", "add", str(folder), *base, "--preprocess", "exact"]) == 0  # nothing new: nothing recorded
    assert main(["index", "status", *base]) == 0
    assert f"{n} vectors; precision fp32, decode fast (JPEG " in capsys.readouterr().out

    assert main(["search", "a", "dog", "-people", "--not", "cars", *base, "--top-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and set(hits[0]) == {"path", "score", "time"} and hits[0]["time"] is None
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    results = tmp_path / "results"
    results.mkdir()
    os.symlink("/nowhere", results / "old.jpg")  # an old result link is cleared
    assert main(["search", "fruit", *base, "--top-k", "3", "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    links = sorted(results.iterdir())
    assert [p.name for p in links] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [str(p.resolve()) for p in links] == [line.split("  ", 1)[1] for line in lines]

    (results / "keep.txt").write_text("mine")
    assert main(["search", "fruit", *base, "--results", str(results)]) == 2
    assert "not links" in capsys.readouterr().err and (results / "keep.txt").exists()

    target = folder / "more" / "v001.jpg"
    assert main(["similar", str(target), *base, "--top-k", "3", "--json"]) == 0
    similar = json.loads(capsys.readouterr().out)
    assert len(similar) == 3 and str(target) not in [h["path"] for h in similar]

    shutil.copy(target, folder / "dupe.jpg")
    assert main(["index", "add", str(folder), *base]) == 0  # the library's own model, no --model needed
    capsys.readouterr()
    assert main(["duplicates", *base, "--threshold", "0.99999", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [sorted(h["path"] for h in g) for g in groups] == [sorted([str(target), str(folder / "dupe.jpg")])]

    assert main(["index", "remove", str(folder), *base]) == 0
    capsys.readouterr()
    assert main(["search", "fruit", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["search", *base]) == 2
    assert main(["index", "status", "--db", str(tmp_path / "nothing.db")]) == 2


def test_db_path_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from clipworks.settings import db_path

    monkeypatch.delenv("CLIPWORKS_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert db_path() == tmp_path / "data" / "clipworks" / "library.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert db_path() == tmp_path / ".local" / "share" / "clipworks" / "library.db"
    monkeypatch.setenv("CLIPWORKS_DB", "~/x.db")
    assert db_path() == tmp_path / "x.db"


def test_the_model_row_lists_every_precision_and_decode_that_made_its_vectors(tmp_path: Path):
    from clipworks.library.store import Store

    store = Store(tmp_path / "lib.db", create=True)
    row = store.ensure_model("m", "w", 4, None)
    assert row.produced_by() == "precision and decode not recorded"  # vectors from before schema 6, imports
    for precision, decode in (("fp32", "fast (JPEG simplejpeg)"), ("fp32", "exact"), ("int8", "exact")):
        store.record_production(row.id, precision, decode)
    row = store.find_model("m", "w")
    assert (row.precision, row.decode) == ("fp32; int8", "fast (JPEG simplejpeg); exact")
    assert row.produced_by() == "precision fp32; int8, decode fast (JPEG simplejpeg); exact"
    store.close()
