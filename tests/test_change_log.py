"""The change log (schema 7) and what reads it: a side file and an approximate index that take in a small
change by reading the files it touched, not every vector (at 10M photos, 20 GB)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from clipworks.library import Library, make_filters
from clipworks.library import store as store_module
from clipworks.library.ann import _fresh_rows, sync_ann
from clipworks.library.metadata import Facets, FileFacets
from clipworks.library.search import DEAD_FRACTION, ExactIndex, MatrixCache, SideRows
from clipworks.library.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ModelRow,
    Revision,
    Store,
    files_of,
    moment_key,
    rows_of_files,
    to_blob,
)
from library_helpers import library_of_dim

DIM = 16
NEW_FILE = "INSERT INTO files (id, path, size, mtime_ns, updated_at) VALUES (?, CAST(? AS TEXT), 0, 0, 0)"
PUT_VECTOR = "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)"
PUT_MOMENT = "INSERT INTO moments VALUES (?, ?, ?, ?, ?)"


def unit(rng: np.random.Generator, rows: int = 1) -> np.ndarray:
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def side_folder(db: Path) -> Path:
    return db.with_name(db.name + "-vectors")


def rows_files(db: Path) -> list[Path]:
    return sorted(side_folder(db).glob("*.f32"))


def add_file(conn: sqlite3.Connection, file_id: int, path: str) -> None:
    conn.execute(NEW_FILE, (file_id, path.encode()))


# -- the log -------------------------------------------------------------------------------------------


def test_every_write_a_search_sees_logs_its_file_and_nothing_else(tmp_path: Path) -> None:
    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/p/{i:02d}.jpg" for i in range(1, 21)], DIM)
    rng = np.random.default_rng(0)
    blob = to_blob(unit(rng)[0])
    with Store(db) as store:
        (model,) = store.models()
        m = model.id
        writes: list[tuple[str, list[tuple[str, tuple]], set[int]]] = [
            ("a vector replaced", [("INSERT OR REPLACE INTO embeddings VALUES (?, 2, ?)", (m, blob))], {2}),
            ("a vector updated", [("UPDATE embeddings SET vector = ? WHERE file_id = 3", (blob,))], {3}),
            ("a vector deleted", [("DELETE FROM embeddings WHERE file_id = 4", ())], {4}),
            # Under an outer OR IGNORE, a trigger's own OR REPLACE would have kept the log's older generation.
            ("a vector written again under OR IGNORE",
             [("INSERT OR IGNORE INTO embeddings VALUES (?, 4, ?)", (m, blob))], {4}),
            ("a file gone", [("UPDATE files SET deleted_at = 1 WHERE id = 5", ())], {5}),
            ("a file back", [("UPDATE files SET deleted_at = NULL WHERE id = 5", ())], {5}),
            ("a file deleted with its vectors", [("DELETE FROM files WHERE id = 6", ())], {6}),
            ("a video's moments", [(PUT_MOMENT, (m, 7, o, o, blob)) for o in range(3)], {7}),
            ("the moments removed", [("DELETE FROM moments WHERE file_id = 7", ())], {7}),
            ("metadata a filter reads", [("UPDATE files SET make = 'Canon', taken_at = 5 WHERE id = 8", ())], {8}),
            ("what no search reads", [("UPDATE files SET size = 5, hash = 'x' WHERE id = 8", ())], set()),
            ("a facet written as it was", [("UPDATE files SET make = 'Canon' WHERE id = 8", ())], set()),
            ("a gone file's time of going", [("UPDATE files SET deleted_at = 1 WHERE id = 9", ()),
                                             ("UPDATE files SET deleted_at = 2 WHERE id = 9", ())], {9}),
            ("a file added with its vector", [(NEW_FILE, (30, b"/p/30.jpg")), (PUT_VECTOR, (m, 30, blob))], {30}),
            ("the model's vectors all removed", [("DELETE FROM models WHERE id = ?", (m,))],
             set(range(1, 21)) - {6} | {30}),
        ]  # fmt: skip
        for what, statements, expected in writes:
            before = store.revision()
            with store.write() as conn:
                for sql, parameters in statements:
                    conn.execute(sql, parameters)
            changed = store.files_changed_since(before, 100)
            assert changed is not None and set(changed.tolist()) == expected, what
            assert store.files_changed_since(store.revision(), 100).tolist() == [], what  # nothing since


def test_the_log_answers_only_from_its_migration_on_and_for_few_files(tmp_path: Path) -> None:
    """A library from before schema 7: what changed before the migration is not known (None: read all)."""
    db = tmp_path / "lib.db"
    conn = sqlite3.connect(db)
    conn.executescript("".join(MIGRATIONS[:6]))
    conn.execute("PRAGMA user_version = 6")
    conn.execute("UPDATE state SET value = 41 WHERE key = 'generation'")
    conn.commit()
    conn.close()
    with Store(db) as store:
        assert store.version == SCHEMA_VERSION
        migrated = store.revision()
        assert migrated.generation == 41
        assert store.files_changed_since(migrated._replace(generation=40), 100) is None  # before the log began
        assert store.files_changed_since(migrated, 100).tolist() == []
        model = store.ensure_model("m", "f", DIM, None)
        with store.write() as conn:
            for i in range(1, 6):
                add_file(conn, i, f"/p/{i}.jpg")
                conn.execute("INSERT INTO embeddings VALUES (?, ?, ?)", (model.id, i, to_blob(np.ones(DIM))))
        assert store.files_changed_since(migrated, 5).tolist() == [1, 2, 3, 4, 5]
        assert store.files_changed_since(migrated, 4) is None  # more than asked for: the caller reads everything


def test_the_log_forgets_what_only_a_cache_older_than_its_span_would_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row a commit (the stamps) and one per file ever changed would grow without end: every few commits
    the log keeps only its last span. A revision within it is answered as before; an older one is told to
    read everything, and a library searched from such a side file still answers as SQLite does."""
    monkeypatch.setattr(store_module, "CHANGE_LOG_COMMITS", 12)
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 4)
    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/p/{i:02d}.jpg" for i in range(1, 41)], DIM)
    rng = np.random.default_rng(3)
    with Library(db, ann="off") as library:
        library.vectors()  # a side file of the library as made
        with Store(db) as store:
            (model,) = store.models()
            seen: list[tuple[Revision, set[int]]] = []  # each revision, and the files changed since it
            for commit in range(30):
                revision = store.revision()
                seen.append((revision, set()))
                with store.write() as conn:
                    conn.execute(PUT_VECTOR, (model.id, commit + 1, to_blob(unit(rng)[0])))
                for _, changed in seen:
                    changed.add(commit + 1)
            now = store.revision()
            kept = store.conn.execute("SELECT min(generation), count(*) FROM generations").fetchone()
            assert now.generation - 12 - 4 < kept[0] <= now.generation - 12 and kept[1] == now.generation - kept[0] + 1
            assert store.conn.execute("SELECT min(generation) FROM changed_files").fetchone()[0] >= kept[0]
            for revision, changed in seen:
                answer = store.files_changed_since(revision, 100)
                if revision.generation >= kept[0]:
                    assert answer is not None and set(answer.tolist()) == changed
                else:
                    assert answer is None
        query = unit(np.random.default_rng(9))[0]
        answer = [(h.path, round(h.score, 5)) for h in library.search_vector(query, top_k=10)]
    with Library(db, ann="off", side_file=False) as plain:
        assert [(h.path, round(h.score, 5)) for h in plain.search_vector(query, top_k=10)] == answer


def test_rows_of_files_finds_a_photo_and_every_moment_of_a_video() -> None:
    keys = np.sort(np.array([moment_key(3, o) for o in range(4)] + [moment_key(8, 0), 1, 2, 3, 5, 9], np.int64))
    found = rows_of_files(keys, np.array([3, 9, 4]))
    assert sorted(keys[found].tolist()) == sorted([moment_key(3, o) for o in range(4)] + [3, 9])
    assert rows_of_files(keys, np.array([], np.int64)).tolist() == []
    assert rows_of_files(np.array([], np.int64), np.array([3])).tolist() == []


# -- the side file -------------------------------------------------------------------------------------


def assert_current(index: ExactIndex, store: Store) -> None:
    (model,) = store.models()
    ids, matrix = store.live_vectors(model)
    np.testing.assert_array_equal(index.ids, ids)
    np.testing.assert_array_equal(np.asarray(index.matrix), matrix)
    query = unit(np.random.default_rng(9))[0]
    np.testing.assert_allclose(index.scores(query), matrix @ query, atol=1e-6)  # BLAS blocks rows its own way
    some = ids[:: max(1, len(ids) // 7)]
    np.testing.assert_array_equal(index.vectors_of(some), matrix[np.searchsorted(ids, some)])


def test_side_rows_read_as_the_rows_they_stand_for() -> None:
    physical = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    rows = np.array([4, 0, 5, 2])
    side, plain = SideRows(physical, rows), physical[rows]
    assert len(side) == 4 and side.shape == plain.shape
    np.testing.assert_array_equal(side[1], plain[1])
    np.testing.assert_array_equal(side[np.int64(-1)], plain[-1])
    np.testing.assert_array_equal(side[np.array([3, 0])], plain[[3, 0]])
    np.testing.assert_array_equal(np.asarray(side[1:3]), plain[1:3])
    np.testing.assert_array_equal(side @ np.ones(3, np.float32), plain @ np.ones(3, np.float32))
    np.testing.assert_array_equal(np.asarray(side, np.float64), plain.astype(np.float64))


@contextmanager
def hundred_photos(tmp_path: Path, photos: int = 100) -> Iterator[tuple[Path, Store, ModelRow, MatrixCache, Path]]:
    """A library of 100 photos (or ``photos``) whose side file is made: (db, store, model, its cache, the
    rows file); the first map is saved whole at the store's generation then."""
    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/p/{i:03d}.jpg" for i in range(1, photos + 1)], DIM)
    with Store(db) as store:
        (model,) = store.models()
        cache = MatrixCache(db, model)
        assert_current(cache.get(store), store)
        (rows_file,) = rows_files(db)
        yield db, store, model, cache, rows_file


def test_a_small_change_is_appended_to_the_side_file_not_written_again(tmp_path: Path) -> None:
    """Photos added, re-embedded and gone, a video's moments added and then replaced: each change appends
    just the vectors of the files it touched to the same rows file, and the index equals SQLite's vectors
    (keys, every row, scores) in this process and in a new one."""
    rng = np.random.default_rng(1)
    with hundred_photos(tmp_path, 200) as (db, store, model, cache, rows_file):
        whole_generation = store.generation()
        row_bytes = DIM * 4
        assert rows_file.stat().st_size == 200 * row_bytes

        def change(statements: list[tuple[str, tuple]], appended: int) -> None:
            size = rows_file.stat().st_size
            with store.write() as conn:
                for sql, parameters in statements:
                    conn.execute(sql, parameters)
            index = cache.get(store)
            assert rows_files(db) == [rows_file], "a change of a few files wrote a new side file"
            assert rows_file.stat().st_size == size + appended * row_bytes
            assert isinstance(index.matrix, SideRows)
            assert_current(index, store)
            assert_current(MatrixCache(db, model).get(store), store)  # another process: the map and the rows

        def blob() -> bytes:
            return to_blob(unit(rng)[0])

        m = model.id
        change(
            [(NEW_FILE, (300 + i, f"/p/new{i}.jpg".encode())) for i in range(3)]
            + [(PUT_VECTOR, (m, 300 + i, blob())) for i in range(3)],
            3,
        )
        change([(PUT_VECTOR, (m, i, blob())) for i in (5, 77)], 2)
        change([("UPDATE files SET deleted_at = 1 WHERE id IN (6, 150, 301)", ())], 0)
        change([(NEW_FILE, (400, b"/v.mp4"))] + [(PUT_MOMENT, (m, 400, o, o * 2.0, blob())) for o in range(4)], 4)
        change(
            [("DELETE FROM moments WHERE file_id = 400", ())]
            + [(PUT_MOMENT, (m, 400, o, o * 1.0, blob())) for o in range(2)],
            2,
        )
        change([("UPDATE files SET deleted_at = NULL WHERE id = 150", ())], 1)  # fmt: skip
        # The whole map of the first generation and the newest one's difference from it: the others removed.
        assert map_generations(db) == [whole_generation, store.generation()]
        assert is_difference(newest_map(db))


def map_generations(db: Path) -> list[int]:
    return sorted(int(p.name.split("-g")[-1].removesuffix(".rows.npz")) for p in side_folder(db).glob("*.rows.npz"))


def newest_map(db: Path) -> Path:
    return max(side_folder(db).glob("*.rows.npz"), key=lambda p: int(p.name.split("-g")[-1].split(".")[0]))


def is_difference(map_file: Path) -> bool:
    with np.load(map_file) as saved:
        return "whole" in saved.files


def stored_values(map_file: Path) -> int:
    """How many numbers a saved map holds: what its size grows with."""
    with np.load(map_file) as saved:
        return sum(saved[name].size for name in saved.files)


def test_a_generations_map_is_its_difference_from_the_whole_map_until_that_grows_past_its_fraction(
    tmp_path: Path,
) -> None:
    """Each small change saves only the keys it drops and adds since the map saved whole (at 10M photos
    160 MB, written at every change before), read back by a new process as the whole map would be; once
    the difference passes DELTA_FRACTION of the keys the map is saved whole again and the old one goes."""
    photos = 400
    rng = np.random.default_rng(4)
    with hundred_photos(tmp_path, photos) as (db, store, model, cache, _):
        whole = store.generation()
        whole_size = stored_values(newest_map(db))
        changed = 0
        while map_generations(db)[0] == whole:
            with store.write() as conn:  # two re-embedded, one removed, one added: under EXTEND_FRACTION
                for i in rng.choice(np.arange(1, photos + 1), 2, replace=False).tolist():
                    conn.execute(PUT_VECTOR, (model.id, i, to_blob(unit(rng)[0])))
                conn.execute("UPDATE files SET deleted_at = 1 WHERE id = ?", (int(rng.integers(1, photos + 1)),))
                add_file(conn, 1000 + changed, f"/p/new{changed}.jpg")
                conn.execute(PUT_VECTOR, (model.id, 1000 + changed, to_blob(unit(rng)[0])))
            changed += 1
            assert_current(cache.get(store), store)
            assert_current(MatrixCache(db, model).get(store), store)  # another process: whole map + difference
            if map_generations(db)[0] == whole:
                assert map_generations(db) == [whole, store.generation()] and is_difference(newest_map(db))
                assert stored_values(newest_map(db)) <= 3 * whole_size / 16  # three arrays of at most 1/16
        # Up to 6 keys more in the difference per change (2 dropped and 2 added for the re-embedded, 1
        # dropped, 1 added): past 1/16 of the ~400 keys after at least 4 changes and before 30.
        assert 4 < changed < 30, changed
        assert map_generations(db) == [store.generation()] and not is_difference(newest_map(db))
        assert len(rows_files(db)) == 1  # the rows still appended to, not written again


@pytest.mark.parametrize("damage", ["removed", "of another history"])
def test_a_difference_whose_whole_map_is_gone_or_replaced_is_not_read(tmp_path: Path, damage: str) -> None:
    with hundred_photos(tmp_path) as (db, store, model, cache, first):
        whole_file = newest_map(db)
        with store.write() as conn:
            conn.execute(PUT_VECTOR, (model.id, 7, to_blob(np.eye(DIM)[0])))
        assert_current(cache.get(store), store)
        assert is_difference(newest_map(db))
        if damage == "removed":
            whole_file.unlink()
        else:  # the same generation saved with another stamp: another history's map
            with np.load(whole_file) as saved:
                fields = {name: saved[name] for name in saved.files}
            fields["stamp"] = fields["stamp"] + 1
            with whole_file.open("wb") as fh:
                np.savez(fh, **fields)
        assert_current(MatrixCache(db, model).get(store), store)
        assert rows_files(db) != [first]  # nothing tells which rows hold what: written anew


def test_an_old_generation_stays_readable_while_a_change_is_appended(tmp_path: Path) -> None:
    """A reader holding the index of an earlier generation reads the same vectors after the file grew:
    appended rows never overwrite mapped ones."""
    db = tmp_path / "lib.db"
    vectors = library_of_dim(db, [f"/p/{i:03d}.jpg" for i in range(1, 101)], DIM)
    with Store(db) as store:
        (model,) = store.models()
        old = MatrixCache(db, model).get(store)
        before = np.asarray(old.matrix).copy()
        with store.write() as conn:
            conn.execute(PUT_VECTOR, (model.id, 1, to_blob(-vectors["/p/001.jpg"])))
        assert_current(MatrixCache(db, model).get(store), store)
    np.testing.assert_array_equal(np.asarray(old.matrix), before)


def test_rows_an_interrupted_append_left_are_never_read(tmp_path: Path) -> None:
    with hundred_photos(tmp_path) as (db, store, model, _, rows_file):
        with rows_file.open("ab") as fh:  # a process killed mid-append: a row and a half of garbage
            fh.write(np.full(DIM + DIM // 2, np.nan, np.float32).tobytes())
        with store.write() as conn:
            conn.execute(PUT_VECTOR, (model.id, 7, to_blob(np.eye(DIM)[0])))
        index = MatrixCache(db, model).get(store)
        assert_current(index, store)
        assert not np.isnan(np.asarray(index.matrix)).any()


def test_a_side_file_mostly_of_dead_rows_is_written_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with hundred_photos(tmp_path) as (db, store, model, cache, first):
        rounds = 0
        while rows_files(db) == [first]:
            with store.write() as conn:  # 9 of 100 re-embedded a time: under the 10% that is appended
                for i in rng.choice(np.arange(1, 101), 9, replace=False).tolist():
                    conn.execute(PUT_VECTOR, (model.id, i, to_blob(unit(rng)[0])))
            assert_current(cache.get(store), store)
            rounds += 1
        assert rounds == 1 + int(DEAD_FRACTION * 100 / (1 - DEAD_FRACTION) // 9)  # dead rows past the fraction
        assert not first.exists()
        (second,) = rows_files(db)
        assert second.stat().st_size == 100 * DIM * 4  # written anew: live rows only


def test_a_large_change_writes_the_side_file_again(tmp_path: Path) -> None:
    with hundred_photos(tmp_path) as (db, store, _, cache, first):
        with store.write() as conn:
            conn.execute("UPDATE files SET deleted_at = 1 WHERE id <= 20")
        assert_current(cache.get(store), store)
        assert rows_files(db) != [first] and rows_files(db)[0].stat().st_size == 80 * DIM * 4


def test_a_side_file_from_before_the_log_is_written_again(tmp_path: Path) -> None:
    """The side file of a generation from before schema 7 cannot know what changed since: written anew."""
    with hundred_photos(tmp_path) as (db, store, model, _, first):
        with store.write() as conn:
            conn.execute("UPDATE files SET deleted_at = 1 WHERE id = 3")
            conn.execute("UPDATE state SET value = (SELECT value + 2 FROM state WHERE key = 'generation') "
                         "WHERE key = 'changes_from'")  # fmt: skip
        assert_current(MatrixCache(db, model).get(store), store)
        assert rows_files(db) != [first]


def test_a_side_file_mapped_before_generations_were_stamped_is_written_again(tmp_path: Path) -> None:
    """A map saved by clipworks before schema 8 has no stamp, so nothing tells which history it is of."""
    with hundred_photos(tmp_path) as (db, store, model, _, first):
        (map_file,) = side_folder(db).glob("*.rows.npz")
        with np.load(map_file) as saved:
            fields = {name: saved[name] for name in saved.files if name != "stamp"}
        with map_file.open("wb") as fh:
            np.savez(fh, **fields)
        with store.write() as conn:
            conn.execute(PUT_VECTOR, (model.id, 7, to_blob(np.eye(DIM)[0])))
        assert_current(MatrixCache(db, model).get(store), store)
        assert rows_files(db) != [first]


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_a_side_file_another_process_replaces_while_it_is_opened_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """The map is read without the lock, so another process's rewrite can remove (or a crash leave short)
    the rows file it names before it is mapped: the index is then made under the lock, not an error."""
    with hundred_photos(tmp_path) as (db, store, model, _, first):
        read = MatrixCache._read_map

        def read_then_replaced(self: MatrixCache, library_id: int, generation: int) -> object:
            found = read(self, library_id, generation)
            if first.exists():  # after the checks, before the mapping
                if damage == "removed":
                    first.unlink()
                else:
                    os.truncate(first, first.stat().st_size // 2)
            return found

        monkeypatch.setattr(MatrixCache, "_read_map", read_then_replaced)
        index = MatrixCache(db, model).get(store)
        monkeypatch.undo()
        assert_current(index, store)


def restore(backup: Path, db: Path) -> None:
    """What restoring a backup copy does: the database file replaced, its journal gone."""
    for journal in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        journal.unlink(missing_ok=True)
    shutil.copyfile(backup, db)


@pytest.mark.parametrize("writes_after_restore", [2, 3])
def test_a_library_restored_from_a_backup_never_reads_its_abandoned_historys_side_files(
    tmp_path: Path, writes_after_restore: int
) -> None:
    """A backup taken at generation g; the library changed on (the best 5 photos removed, another
    re-embedded next to the query) and searched, so its side file and index are of g + 2; the backup
    restored and changed otherwise. At g + 2 again (the same number) and past it, the answer is the
    restored database's, as one read from SQLite: its side file and index are not the abandoned ones."""
    db, backup = tmp_path / "lib.db", tmp_path / "backup.db"
    library_of_dim(db, [f"/p/{i:04d}.jpg" for i in range(2000)], DIM)
    rng = np.random.default_rng(10)
    query = unit(rng)[0]

    def write(*statements: tuple[str, tuple]) -> None:
        with Store(db) as store, store.write() as conn:
            for sql, parameters in statements:
                conn.execute(sql, parameters)

    def near() -> bytes:
        vector = query + 0.05 * unit(rng)[0]
        return to_blob(vector / np.linalg.norm(vector))

    with Store(db) as store:
        (model,) = store.models()
    write(*[(PUT_VECTOR, (model.id, i, near())) for i in range(1, 6)])
    best = {f"/p/{i - 1:04d}.jpg" for i in range(1, 6)}  # files 1 to 5
    with Library(db, ann="on", ann_dtype="f32") as library:
        assert {hit.path for hit in library.search_vector(query, top_k=5)} == best
        with Store(db) as store:
            store.conn.execute("VACUUM INTO ?", (str(backup),))
        write(("UPDATE files SET deleted_at = 1 WHERE id <= 5", ()))
        library.search_vector(query, top_k=10)
        write((PUT_VECTOR, (model.id, 6, near())))
        library.search_vector(query, top_k=10)
    restore(backup, db)
    for n in range(writes_after_restore):
        write((PUT_VECTOR, (model.id, 100 + n, to_blob(unit(rng)[0]))))
    with Library(db, ann="on", ann_dtype="f32") as library, Library(db, ann="off", side_file=False) as plain:
        hits = library.search_vector(query, top_k=10)
        assert hits == plain.search_vector(query, top_k=10)
        assert best <= {hit.path for hit in hits}  # gone only in the abandoned history
        with Store(db) as store:
            assert_current(library.vectors(), store)


# -- the approximate index -----------------------------------------------------------------------------


class CountingRows(SideRows):
    """The side file's rows, counting how many any read gathers."""

    def __init__(self, physical: np.ndarray, rows: np.ndarray, tally: list[int]) -> None:
        super().__init__(physical, rows)
        self.tally = tally

    def __getitem__(self, item):  # type: ignore[no-untyped-def]
        part = super().__getitem__(item)
        if isinstance(part, SideRows):
            return CountingRows(part.physical, part.rows, self.tally)
        self.tally.append(len(part))
        return part

    def __array__(self, dtype=None, copy=None):  # type: ignore[no-untyped-def]
        self.tally.append(len(self.rows))
        return super().__array__(dtype, copy)


@pytest.mark.parametrize("dtype", ["f32", "pq"])
def test_the_index_update_reads_only_the_files_the_log_names(tmp_path: Path, dtype: str) -> None:
    """With the log, an update of a 3,000-vector index compares and adds the rows of the 12 files it names
    (re-embedded, new, gone), not all 3,000; the index it makes is the one a full comparison makes."""
    rng = np.random.default_rng(3)
    ids = np.arange(1, 3001, dtype=np.int64)
    matrix = unit(rng, 3000)
    sync_ann(tmp_path / "log", Revision(1, 1, 11), 1, ExactIndex(ids, matrix), dtype)
    sync_ann(tmp_path / "all", Revision(1, 1, 11), 1, ExactIndex(ids, matrix), dtype)
    changed = np.array([10, 20, 30, 40, 3001, 3002, 3003, 3004, 5, 6, 7, 8], np.int64)
    new_ids = np.concatenate([np.setdiff1d(ids, [5, 6, 7, 8]), [3001, 3002, 3003, 3004]])
    new = matrix[np.minimum(new_ids, 3000) - 1].copy()
    new[np.isin(new_ids, [10, 20, 30, 40, 3001, 3002, 3003, 3004])] = unit(rng, 8)
    tally: list[int] = []
    exact = ExactIndex(new_ids, CountingRows(new, np.arange(len(new_ids)), tally))
    asked: list[tuple[Revision, int]] = []

    def changes(since: Revision, most: int) -> np.ndarray:
        asked.append((since, most))
        return changed

    logs: list[str] = []
    ann = sync_ann(tmp_path / "log", Revision(1, 2, 12), 1, exact, dtype, logs.append, changes)
    assert asked == [(Revision(1, 1, 11), 601)] and sum(tally) <= 2 * len(changed), tally  # compared, then added
    assert logs == ["ann index: +4 -4 vectors (4 replaced)"]
    full = sync_ann(tmp_path / "all", Revision(1, 2, 12), 1, ExactIndex(new_ids, new), dtype)
    np.testing.assert_array_equal(ann.labels, full.labels)
    query = new[np.searchsorted(new_ids, 3002)]
    assert ann.top_k(query, 5)[0].tolist() == full.top_k(query, 5)[0].tolist()
    assert ann.top_k(query, 1)[0].tolist() == [3002]
    # What `entry_rows` would make from scratch, handed over by the update.
    np.testing.assert_array_equal(ann.entry_rows(), type(ann)(exact, ann.index, ann.labels, ann.kind).entry_rows())


def test_without_a_log_every_row_is_compared(tmp_path: Path) -> None:
    """Without a log (None: from before schema 7, or too many changes), every row is compared."""
    rng = np.random.default_rng(4)
    ids = np.arange(1, 2001, dtype=np.int64)
    matrix = unit(rng, 2000)
    state_folder = tmp_path / "ann"
    sync_ann(state_folder, Revision(1, 1, 11), 1, ExactIndex(ids, matrix), "f32")
    moved = matrix.copy()
    moved[99] = unit(rng)[0]
    opened = sync_ann(state_folder, Revision(1, 1, 11), 1, ExactIndex(ids, matrix), "f32")
    saved = Revision(1, 1, 11)
    rows, removed, replaced, _ = _fresh_rows(ExactIndex(ids, moved), opened.labels, _sigs(state_folder), saved, None)
    assert rows.tolist() == [99] and (removed, replaced) == (0, 1)
    rows, *_ = _fresh_rows(ExactIndex(ids, moved), opened.labels, _sigs(state_folder), saved, lambda g, m: None)
    assert rows.tolist() == [99]


def _sigs(folder: Path) -> np.ndarray:
    from clipworks.library.ann import _paths

    return np.load(_paths(folder, 1, 1).signatures).astype(np.float32)


# -- the library ---------------------------------------------------------------------------------------


def test_a_library_after_index_changes_answers_as_one_read_from_sqlite(tmp_path: Path) -> None:
    """A library of 2,000 photos with its approximate index: photos re-embedded next to the query, new
    ones and gone ones, in several commits; each search afterwards answers as a library without side file
    or index does, and the side file was appended to, not written again."""
    db = tmp_path / "lib.db"
    paths = [f"/p/{i:04d}.jpg" for i in range(2000)]
    library_of_dim(db, paths, DIM)
    rng = np.random.default_rng(6)
    query = unit(rng)[0]
    with Library(db, ann="on", ann_dtype="f32") as library:
        library.search_vector(query, top_k=10)
        (first,) = rows_files(db)
        for round_no in range(3):
            with Store(db) as store, store.write() as conn:
                (model,) = store.models()
                for i in rng.choice(2000, 5, replace=False).tolist():
                    near = query + 0.05 * unit(rng)[0]
                    conn.execute(PUT_VECTOR, (model.id, i + 1, to_blob(near / np.linalg.norm(near))))
                for i in range(3):
                    file_id = 5000 + round_no * 10 + i
                    add_file(conn, file_id, f"/p/new-{round_no}-{i}.jpg")
                    conn.execute(PUT_VECTOR, (model.id, file_id, to_blob(unit(rng)[0])))
                conn.execute(
                    "UPDATE files SET deleted_at = 1 WHERE id IN (SELECT id FROM files ORDER BY random() LIMIT 4)"
                )
            hits = library.search_vector(query, top_k=10)
            with Library(db, ann="off", side_file=False) as plain:
                assert hits == plain.search_vector(query, top_k=10), round_no
        assert rows_files(db) == [first]


def facet_rows(facets: Facets) -> list[tuple]:
    """Each row's facets with its camera by name (codes differ between a table kept and one read anew)."""
    names = [*facets.cameras, None]
    columns = (facets.taken_at, facets.local, facets.lat, facets.lon, facets.video)
    known = [np.where(np.isnan(c.astype(float)), None, c.astype(float)) for c in columns]  # NaN is not NaN
    return [(*(c[i] for c in known), names[facets.camera[i]]) for i in range(len(facets.taken_at))]


def test_the_filters_arrays_take_in_a_change_by_reading_the_files_it_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cameras, capture times and places changed, photos added and gone, a video added: after each change
    the arrays filters read equal those read anew from SQLite, and only the changed files were read."""
    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/p/{i:03d}.jpg" for i in range(1, 201)], DIM)
    reads: list[int | None] = []
    read = FileFacets.read.__func__  # type: ignore[attr-defined]

    def counted(cls: type[FileFacets], conn: sqlite3.Connection, files: np.ndarray | None = None) -> FileFacets:
        reads.append(None if files is None else len(files))
        return read(cls, conn, files)

    monkeypatch.setattr(FileFacets, "read", classmethod(counted))
    rng = np.random.default_rng(8)
    changes = [
        "UPDATE files SET make = 'Canon', model = 'EOS R5', taken_at = 1.6e9, taken_offset = 3600 WHERE id IN (3, 4)",
        "UPDATE files SET make = 'CANON', model = 'EOS R5', lat = 48.85, lon = 2.35 WHERE id = 5",
        "UPDATE files SET make = NULL, model = NULL WHERE id = 3",
        "UPDATE files SET deleted_at = 1 WHERE id IN (10, 11)",
        "UPDATE files SET deleted_at = NULL, make = 'Nikon' WHERE id = 10",
    ]
    with Library(db, ann="off") as library:
        assert facet_rows(library.facets())  # the first read: every file
        assert reads == [None]
        for number, sql in enumerate([*changes, "video"]):
            with Store(db) as store, store.write() as conn:
                if sql == "video":
                    (model,) = store.models()
                    add_file(conn, 900, "/v.mp4")
                    conn.execute("UPDATE files SET kind = 'video', taken_at = 1.7e9 WHERE id = 900")
                    for o in range(3):
                        conn.execute(PUT_MOMENT, (model.id, 900, o, float(o), to_blob(unit(rng)[0])))
                else:
                    conn.execute(sql)
            facets = library.facets()
            with Store(db) as store, store.snapshot() as conn:
                files = files_of(store.live_vectors(store.models()[0])[0])
                assert facet_rows(facets) == facet_rows(FileFacets.read(conn).of_rows(files)), sql
            assert reads[-2] is not None and reads[-2] <= 2, (number, reads)  # the library's: just those files
        videos = library.filtered_rows(make_filters(kind="video"))
        assert len(videos) == 3 and set(files_of(library.vectors().ids[videos]).tolist()) == {900}
        canon = library.filtered_rows(make_filters(camera="canon"))
        assert set(library.vectors().ids[canon].tolist()) == {4, 5}
