"""D-Robotics' hobot_clip (``clip_manage``): its ClipItems database and its result folder.

The robot's side is written here as ``clip_manage`` does it (src/database.cpp, src/clip_manage_node.cpp): its
own CREATE TABLE, ``insertItem`` (skip a url already there, else one row: millisecond timestamp, type 1, empty
name, text and extra, the url, the feature as raw float32), ``Query`` (every row whose type is not 0, cosine
over exactly 512 floats) and the folder its ``index.html`` lists (names ending in jpg, jpeg, png or gif).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipworks.cli.main import main
from clipworks.library import Library
from clipworks.library.results import COPY_SIZE
from library_helpers import library_of_dim, make_variants, stored_vectors

ROBOT_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS ClipItems ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "timestamp INTEGER,"
    "type BOOLEAN,"
    "name TEXT,"
    "text TEXT,"
    "url TEXT,"
    "feature BLOB,"
    "extra TEXT);"
)
ROBOT_INSERT = (
    "INSERT INTO ClipItems (id, timestamp, type, name, text, url, feature, extra) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?);"
)
# The names the robot's index.html shows (its isImageFile).
ROBOT_PAGE_SHOWS = re.compile(r"\.(jpe?g|png|gif)$", re.IGNORECASE)


def robot_storage(db: Path, items: list[tuple[str, np.ndarray]]) -> int:
    """clip_manage's storage mode: createTable at start-up, then insertItem per encoded photo. Returns how
    many it inserted (the C API autocommits each statement)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(ROBOT_CREATE_TABLE)
        inserted = 0
        for url, feature in items:
            if conn.execute("SELECT COUNT(*) FROM ClipItems WHERE url = ?;", (url,)).fetchone()[0] > 0:
                continue  # "Item with URL %s already exists. Skipping insertion."
            stamp = int(time.time() * 1000)
            conn.execute(ROBOT_INSERT, (stamp, 1, "", "", url, np.asarray(feature, np.float32).tobytes(), ""))
            inserted += 1
        return inserted
    finally:
        conn.close()


def robot_query(db: Path, text_feature: np.ndarray, topk: int) -> list[str]:
    """clip_manage's Query over every row (without its paging), as its cosine_similarity reads them: 512 floats."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT type, url, feature FROM ClipItems").fetchall()
    finally:
        conn.close()
    scored = []
    for kind, url, blob in rows:
        if not kind:
            continue
        feature = np.frombuffer(blob, np.float32)
        assert feature.size == 512, f"{url}: the robot would read past its {feature.size} floats"
        scored.append((float(feature @ text_feature / np.linalg.norm(feature) / np.linalg.norm(text_feature)), url))
    return [url for _, url in sorted(scored, reverse=True)[:topk]]


def robot_rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT id, timestamp, type, name, text, url, feature, extra FROM ClipItems ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def lib512(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> tuple[Path, dict[str, np.ndarray]]:
    """A library of 512-d vectors (what ViT-B-32 makes) for real photos, in the order the library lists them."""
    root = tmp_path_factory.mktemp("lib512")
    files = make_variants(photos, root / "photos", 8)
    vectors = library_of_dim(root / "lib.db", [str(p) for p in files], 512)
    return root / "lib.db", vectors


def export(capsys: pytest.CaptureFixture[str], out: Path, lib: Path) -> tuple[int, str]:
    code = main(["index", "export", str(out), "--db", str(lib)])
    return code, capsys.readouterr().err


def test_export_adds_to_a_robot_db_as_its_storage_mode_does(tmp_path: Path, lib512, capsys):
    lib, vectors = lib512
    paths = list(vectors)
    robot_own = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    db = tmp_path / "clip.db"
    robot_storage(db, [(paths[0], robot_own[0]), (paths[1], robot_own[1]), ("/userdata/config/CLIP.png", robot_own[2])])
    before = robot_rows(db)

    started = int(time.time() * 1000)
    code, err = export(capsys, db, lib)
    assert code == 0, err
    assert f"added {len(paths) - 2}, skipped 2 already present" in one_line(err)
    after = robot_rows(db)
    assert after[:3] == before  # every robot row kept as it was, its own vectors for the two known photos too
    added = after[3:]
    assert [row[5] for row in added] == paths[2:]
    for row_id, stamp, kind, name, text, url, feature, extra in added:
        assert row_id > before[-1][0] and kind == 1 and text == "" and extra == "" and name == Path(url).name
        assert started <= stamp <= int(time.time() * 1000)  # milliseconds, as the robot stamps rows
        np.testing.assert_array_equal(np.frombuffer(feature, np.float32), vectors[url])
    # The robot finds the added photos, and its next storage run skips every url clipworks wrote.
    assert robot_query(db, vectors[paths[5]], 1) == [paths[5]]
    assert robot_storage(db, [(p, vectors[p]) for p in paths]) == 0

    code, err = export(capsys, db, lib)
    assert code == 0 and f"added 0, skipped {len(paths)} already present" in one_line(err)
    assert robot_rows(db) == after


def test_export_to_a_new_file_writes_the_robots_table(tmp_path: Path, lib512, capsys):
    lib, vectors = lib512
    out = tmp_path / "clip.db"
    code, err = export(capsys, out, lib)
    assert code == 0 and f"exported {len(vectors)} vectors to {out}" in one_line(err)
    reference = tmp_path / "reference.db"
    robot_storage(reference, [])
    with sqlite3.connect(out) as a, sqlite3.connect(reference) as b:
        assert (
            a.execute("PRAGMA table_info(ClipItems)").fetchall() == b.execute("PRAGMA table_info(ClipItems)").fetchall()
        )
    assert [row[5] for row in robot_rows(out)] == list(vectors)
    assert robot_storage(out, list(vectors.items())) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

    empty = tmp_path / "touched.db"  # `touch clip.db`: the robot's start-up would give it the table
    empty.touch()
    code, err = export(capsys, empty, lib)
    assert code == 0 and f"added {len(vectors)}, skipped 0 already present" in one_line(err)
    assert [row[5] for row in robot_rows(empty)] == list(vectors)


@pytest.mark.parametrize("existing", [False, True], ids=["new file", "robot db"])
@pytest.mark.parametrize("dim", [32, 768])
def test_export_refuses_vectors_that_are_not_512_floats(tmp_path: Path, photos, capsys, dim: int, existing: bool):
    lib = tmp_path / "lib.db"
    library_of_dim(lib, [str(p) for p in photos], dim)
    out = tmp_path / "clip.db"
    if existing:
        robot_storage(out, [("/userdata/config/dog.jpg", np.ones(512, np.float32))])
        before = digest(out)
    code, err = export(capsys, out, lib)
    line = one_line(err)
    assert code == 1 and f"makes {dim}-d vectors" in line and "exactly 512 floats" in line and "ViT-B-32" in line
    if existing:
        assert digest(out) == before
    else:
        assert not out.exists()


@pytest.mark.parametrize(
    ("features", "detail"),
    [
        ([np.ones(256, np.float32)], "1024 bytes"),
        ([np.ones(512, np.float32), np.ones(768, np.float32)], "3072 bytes"),  # one bad row among good ones
        ([np.ones(512, np.float64)], "4096 bytes"),
        ([b"\x00" * 2050], "2050 bytes"),  # not even whole floats
        ([None], "no feature"),
    ],
    ids=["256 floats", "one 768 row", "float64", "2050 bytes", "null"],
)
def test_merge_refuses_a_robot_db_whose_rows_are_not_512_floats(tmp_path: Path, lib512, capsys, features, detail):
    out = tmp_path / "clip.db"
    robot_storage(out, [])
    with sqlite3.connect(out) as conn:
        for i, f in enumerate(features):
            blob = f if f is None or isinstance(f, bytes) else f.tobytes()
            conn.execute(ROBOT_INSERT, (1, 1, "", "", f"/userdata/config/{i}.jpg", blob, ""))
        conn.execute(ROBOT_INSERT, (1, 0, "", "a dog", "", np.ones(3, np.float32).tobytes(), ""))  # text rows: unread
    before = digest(out)
    code, err = export(capsys, out, lib512[0])
    line = one_line(err)
    assert code == 1 and "not 512 float32" in line and detail in line and "left as it was" in line
    assert digest(out) == before


def _text_file(path: Path) -> None:
    path.write_text("not a database\n")


def _clipworks_library(path: Path) -> None:
    library_of_dim(path, ["/photos/a.jpg"], 512)


def _other_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")


def _other_clipitems(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE ClipItems (id INTEGER PRIMARY KEY, path TEXT, vector BLOB)")


def _jpeg(path: Path) -> None:
    Image.new("RGB", (8, 8)).save(path, "JPEG")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_text_file, "is not a SQLite database"),
        (_jpeg, "is not a SQLite database"),
        (_clipworks_library, "without a ClipItems table"),
        (_other_sqlite, "without a ClipItems table"),
        (_other_clipitems, "has no extra, feature, name, text, timestamp, type, url column"),
    ],
    ids=["text", "jpeg", "clipworks library", "other sqlite", "other ClipItems"],
)
def test_export_refuses_a_file_that_is_not_a_robot_db(tmp_path: Path, lib512, capsys, make, says):
    out = tmp_path / "target.db"
    make(out)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    code, err = export(capsys, out, lib512[0])
    line = one_line(err)
    assert code == 2 and str(out) in line and says in line and "left as it was" in line
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before


def test_export_refuses_a_folder(tmp_path: Path, lib512, capsys):
    (tmp_path / "clip.db").mkdir()
    code, err = export(capsys, tmp_path / "clip.db", lib512[0])
    assert code == 2 and "is a folder" in one_line(err)


def test_a_merge_that_fails_leaves_the_robot_db_as_it_was(tmp_path: Path, lib512, capsys):
    lib = lib512[0]
    db = tmp_path / "clip.db"
    robot_storage(db, [("/userdata/config/dog.jpg", np.ones(512, np.float32))])
    # A failure after some rows went in (as a full disk would stop it): SQLite's own abort, mid-insert.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER full BEFORE INSERT ON ClipItems WHEN (SELECT COUNT(*) FROM ClipItems) >= 4 "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    before = digest(db)
    code, err = export(capsys, db, lib)
    line = one_line(err)
    assert code == 1 and str(db) in line and "disk is full" in line and "left as it was" in line
    assert digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.db"]  # no journal or temporary file left


# -- the result folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, photos: list[Path], vit_bundle: Path) -> Path:
    """A library of photos in every format the library indexes (and a PNG named .jpg, and one wider than a copy)."""
    root = tmp_path_factory.mktemp("mixed")
    folder = root / "photos"
    for i, fmt in enumerate(["jpg", "png", "webp", "gif", "bmp", "tiff", "avif"]):
        (variant,) = make_variants(photos[i % len(photos) :], root / fmt, 1, fmt=fmt)
        folder.mkdir(exist_ok=True)
        shutil.move(variant, folder / f"{fmt}.{fmt}")
    Image.open(photos[0]).convert("RGB").save(folder / "png-named.jpg", "PNG")
    wide = Image.open(photos[1]).convert("RGB").resize((2600, 400))
    wide.save(folder / "wide.png")
    for p in photos[:2]:
        shutil.copy(p, folder / p.name)
    Library(root / "lib.db", str(vit_bundle), create=True).index([folder])
    return root / "lib.db"


def search_into(capsys, lib: Path, results: Path, top_k: int) -> tuple[int, list[str], str]:
    code = main(["search", "a", "photo", "--db", str(lib), "--top-k", str(top_k), "--results", str(results)])
    out, err = capsys.readouterr()
    return code, [line.split("  ", 1)[1] for line in out.splitlines()], err


def assert_like(copy: Image.Image, source: Path) -> None:
    with Image.open(source) as im:
        want = np.asarray(im.convert("RGB").resize(copy.size), np.float32)
    assert np.abs(np.asarray(copy, np.float32) - want).mean() < 8, f"{source} does not look like its copy"


def test_results_are_the_names_the_robots_page_shows(tmp_path: Path, mixed: Path, capsys):
    results = tmp_path / "result"  # the folder name the robot's index.html fetches
    code, hits, err = search_into(capsys, mixed, results, 100)
    assert code == 0, err
    assert len(hits) == 11
    names = sorted(os.listdir(results))
    assert names == sorted(f"{i}.jpg" for i in range(len(hits)))  # the robot's own names, nothing else
    assert all(ROBOT_PAGE_SHOWS.search(n) for n in names)
    converted = 0
    for rank, hit in enumerate(hits):
        entry = results / f"{rank}.jpg"
        with Image.open(entry) as image:
            assert image.format == "JPEG"
            image.load()
            if Path(hit).read_bytes()[:3] == b"\xff\xd8\xff":
                assert entry.is_symlink() and os.readlink(entry) == hit  # as the robot links it
            else:
                assert not entry.is_symlink()
                assert max(image.size) <= COPY_SIZE
                assert_like(image, Path(hit))
                converted += 1
    assert converted == 8  # png, webp, gif, bmp, tiff, avif, the PNG named .jpg and the wide PNG
    assert f"wrote 11 photos into {results} (8 as JPEG copies)" in err

    # A second search replaces what the first wrote, copies included, and nothing else is left.
    code, hits, _ = search_into(capsys, mixed, results, 3)
    assert code == 0 and sorted(os.listdir(results)) == ["0.jpg", "1.jpg", "2.jpg"]


def test_a_wide_copy_fits_the_copy_size(tmp_path: Path, mixed: Path, capsys):
    results = tmp_path / "result"
    code, hits, _ = search_into(capsys, mixed, results, 100)
    assert code == 0
    rank = next(i for i, h in enumerate(hits) if h.endswith("wide.png"))
    with Image.open(results / f"{rank}.jpg") as image:
        width, height = image.size
    assert width == COPY_SIZE and abs(height - 400 * COPY_SIZE / 2600) <= 1  # shrunk to fit, aspect kept


def _jpeg_photo(path: Path, comment: bytes | None = None) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, "JPEG", **({"comment": comment} if comment else {}))


@pytest.mark.parametrize(
    ("stranger", "make"),
    [
        ("holiday.jpg", _jpeg_photo),
        ("5.jpg", _jpeg_photo),  # a photo of yours named like a result
        ("6.jpg", lambda p: _jpeg_photo(p, b"Created with GIMP")),
        ("7.jpg", lambda p: p.write_bytes(b"not even an image")),
        ("notes.txt", lambda p: p.write_text("mine")),
        ("8.jpg", Path.mkdir),
    ],
    ids=["a photo", "a photo named like a result", "a JPEG with a comment", "a file", "a text file", "a folder"],
)
def test_results_refuse_a_folder_holding_what_clipworks_did_not_write(
    tmp_path: Path, mixed: Path, capsys, stranger, make
):
    results = tmp_path / "result"
    assert search_into(capsys, mixed, results, 3)[0] == 0  # links and copies of its own
    make(results / stranger)
    before = {name: (results / name).is_symlink() for name in os.listdir(results)}
    code, _, err = search_into(capsys, mixed, results, 100)
    assert code == 2 and stranger in one_line(err) and "not links or copies clipworks wrote" in err
    assert {name: (results / name).is_symlink() for name in os.listdir(results)} == before  # nothing removed


def test_a_robot_result_folder_and_a_cut_short_copy_are_replaced(tmp_path: Path, mixed: Path, capsys):
    results = tmp_path / "result"
    results.mkdir()
    for i in range(12):  # `ln -s <url> result/<i>.jpg`, some of them to photos long gone
        os.symlink(f"/userdata/config/{i}.png", results / f"{i}.jpg")
    (results / "12.jpg").touch()  # and a copy of clipworks' own, cut short as it began
    code, _, err = search_into(capsys, mixed, results, 2)
    assert code == 0, err
    assert sorted(os.listdir(results)) == ["0.jpg", "1.jpg"]


def test_a_hit_that_cannot_be_decoded_is_linked_with_a_warning(tmp_path: Path, photos, vit_bundle: Path, capsys):
    lib = tmp_path / "lib.db"
    gone = str(tmp_path / "gone.png")  # imported from elsewhere: the path is not on this machine
    Library(lib, str(vit_bundle), create=True).index([make_variants(photos, tmp_path / "photos", 2)[0].parent])
    pkl = tmp_path / "more.pkl"
    pkl.write_bytes(pickle.dumps({"img_path": [gone], "embedding": [next(iter(stored_vectors(lib).values()))]}))
    assert main(["index", "import", str(pkl), "--db", str(lib)]) == 0
    results = tmp_path / "result"
    code, hits, err = search_into(capsys, lib, results, 10)
    assert code == 0 and gone in hits
    entry = results / f"{hits.index(gone)}.jpg"
    assert entry.is_symlink() and os.readlink(entry) == gone
    assert f"warning: {gone} cannot be decoded" in err
