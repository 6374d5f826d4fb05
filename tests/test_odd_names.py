"""File names that are not plain text, through index add, search, similar, duplicates, status, export and import.

A POSIX name is bytes: these tests make files whose names are not UTF-8 or hold newlines, tabs, leading
dashes, right-to-left overrides, emoji, spaces and quotes, and check that the library stores each one byte
for byte, that text output keeps one name on one line in the documented form (bash itself decodes the
``$'...'`` strings, see ``clipworks.display``) and that JSON output stays JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.display import quote_path
from clipworks.library import Library
from clipworks.library.store import from_bytes, to_bytes
from library_helpers import library_of_dim, make_variants

NAMES: dict[str, bytes] = {
    "latin-1 bytes": b"caf\xe9.jpg",
    "invalid utf-8": b"\xff\xfe and an encoded surrogate \xed\xb3\xa9.jpg",
    "newline": b"two\nlines.jpg",
    "carriage return": b"back\rwards.jpg",
    "tab": b"tab\there.jpg",
    "leading dash": b"-rf --help.jpg",
    "rtl override": "holiday\u202egpj.exe.jpg".encode(),
    "emoji": "\U0001f600 smile.jpg".encode(),
    "spaces": b"  two  spaces .jpg",
    "quotes": b'it\'s a "quote".jpg',
    "looks quoted": b"$'not\\n quoted'.jpg",
    "backslash": b"back\\slash.jpg",
}
BROKEN = b"broken\n\xff.jpg"  # undecodable as an image too: its error message quotes the name


@dataclass
class Odd:
    db: Path
    photos: bytes  # the folder of odd names, with a byte copy of each in copies/
    odd_root: bytes  # a second library folder whose own name is odd
    embedded: set[bytes]  # every path that has a vector
    broken: bytes


def join(folder: bytes, *names: bytes) -> bytes:
    return b"/".join([folder, *names])


def run(capsys: pytest.CaptureFixture[str], *args: str | bytes) -> tuple[int, str, str]:
    code = main([from_bytes(a) if isinstance(a, bytes) else a for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def as_bash_reads_it(printed: str) -> bytes:
    """The bytes a printed name stands for: a ``$'...'`` string as bash itself evaluates it, else as is."""
    if not printed.startswith("$'"):
        return to_bytes(printed)
    done = subprocess.run(
        ["bash", "-c", f"printf %s {printed}"],
        capture_output=True,
        check=True,
        env={"LC_ALL": "C", "PATH": "/bin:/usr/bin"},
    )
    return done.stdout


def stored_paths(db: Path, sql: str = "SELECT path FROM files") -> set[bytes]:
    """Paths as SQLite holds them, as bytes (independent of the library code)."""
    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    try:
        return {row[0] for row in conn.execute(sql)}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, photos: list[Path], vit_bundle: Path) -> Odd:
    root = tmp_path_factory.mktemp("odd")
    folder = os.fsencode(root / "photos")
    os.makedirs(join(folder, b"copies"))
    embedded = set()
    for variant, name in zip(make_variants(photos, root / "variants", len(NAMES)), NAMES.values(), strict=True):
        os.rename(variant, join(folder, name))
        shutil.copyfile(join(folder, name), join(folder, b"copies", name))  # a duplicate of each
        embedded |= {join(folder, name), join(folder, b"copies", name)}
    with open(join(folder, BROKEN), "wb") as fh:
        fh.write(b"\xff\xd8 not a jpeg")
    odd_root = os.fsencode(root) + b"/lib\xff\nroot"
    os.mkdir(odd_root)
    shutil.copyfile(photos[0], join(odd_root, b"plain.jpg"))
    embedded.add(join(odd_root, b"plain.jpg"))
    db = root / "lib.db"
    assert main(["index", "add", from_bytes(folder), from_bytes(odd_root), "--db", str(db), "--model",
                 str(vit_bundle)]) == 0  # fmt: skip
    return Odd(db, folder, odd_root, embedded, join(folder, BROKEN))


def test_index_stores_every_name_byte_for_byte(odd: Odd) -> None:
    assert stored_paths(odd.db) == odd.embedded | {odd.broken}
    assert stored_paths(odd.db, "SELECT f.path FROM files f JOIN embeddings e ON e.file_id = f.id") == odd.embedded
    assert stored_paths(odd.db, "SELECT path FROM roots") == {odd.photos, odd.odd_root}
    (error,) = stored_paths(odd.db, "SELECT error FROM files WHERE error IS NOT NULL")
    assert BROKEN in error  # the decoder's message names the file exactly
    again = Library(odd.db).index([from_bytes(odd.photos), from_bytes(odd.odd_root)])
    assert (again.new, again.changed, again.deleted, again.unchanged) == (0, 0, 0, len(odd.embedded) + 1)


def test_search_prints_one_line_per_photo(capsys: pytest.CaptureFixture[str], odd: Odd) -> None:
    code, out, err = run(capsys, "search", "a", "photo", "--top-k", "1000", "--db", str(odd.db))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(odd.embedded)
    assert {as_bash_reads_it(line.split("  ", 1)[1]) for line in lines} == odd.embedded
    code, out, _ = run(capsys, "search", "a", "photo", "--top-k", "1000", "--db", str(odd.db), "--json")
    assert code == 0 and out.isascii()
    assert {os.fsencode(hit["path"]) for hit in json.loads(out)} == odd.embedded


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_similar_finds_the_copy_of_each_name(
    capsys: pytest.CaptureFixture[str], odd: Odd, tmp_path: Path, name: bytes
) -> None:
    path, copy = join(odd.photos, name), join(odd.photos, b"copies", name)
    results = tmp_path / "results"
    code, out, err = run(capsys, "similar", path, "--top-k", "3", "--db", str(odd.db), "--results", str(results))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    score, printed = lines[0].split("  ", 1)
    assert as_bash_reads_it(printed) == copy and float(score) > 0.9999
    assert printed == quote_path(from_bytes(copy))
    link = next(p for p in os.listdir(os.fsencode(results)) if p.startswith(b"0."))
    assert os.readlink(join(os.fsencode(results), link)) == copy
    code, out, _ = run(capsys, "similar", path, "--top-k", "3", "--db", str(odd.db), "--json")
    assert code == 0 and out.isascii() and os.fsencode(json.loads(out)[0]["path"]) == copy


def test_duplicates_groups_each_name_with_its_copy(capsys: pytest.CaptureFixture[str], odd: Odd) -> None:
    code, out, err = run(capsys, "duplicates", "--threshold", "0.9999", "--db", str(odd.db))
    assert code == 0, err
    groups: list[set[bytes]] = []
    for line in out.splitlines():
        if line.startswith("group "):
            groups.append(set())
        else:
            groups[-1].add(as_bash_reads_it(line.strip(" ").split("  ", 1)[1]))
    expected = [{join(odd.photos, n), join(odd.photos, b"copies", n)} for n in NAMES.values()]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))
    code, out, _ = run(capsys, "duplicates", "--threshold", "0.9999", "--db", str(odd.db), "--json")
    assert code == 0 and out.isascii()
    assert sorted(sorted(os.fsencode(h["path"]) for h in g) for g in json.loads(out)) == sorted(map(sorted, expected))


def test_status_quotes_folders_and_unreadable_files(capsys: pytest.CaptureFixture[str], odd: Odd) -> None:
    code, out, err = run(capsys, "index", "status", "--db", str(odd.db))
    assert code == 0, err
    folders = [line.removeprefix("  folder ").rsplit(": ", 1)[0] for line in out.splitlines() if "folder " in line]
    assert {as_bash_reads_it(f) for f in folders} == {odd.photos, odd.odd_root}
    (unreadable,) = [line for line in out.splitlines() if line.startswith("  unreadable ")]
    printed = unreadable.removeprefix("  unreadable ").split(": ", 1)[0]
    assert as_bash_reads_it(printed) == odd.broken
    code, out, _ = run(capsys, "index", "status", "--db", str(odd.db), "--json")
    state = json.loads(out)
    assert {os.fsencode(f["path"]) for f in state["folders"]} == {odd.photos, odd.odd_root}
    assert [os.fsencode(e["path"]) for e in state["errors"]] == [odd.broken]


@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".parquet"])
def test_export_and_import_keep_names_exact(odd: Odd, tmp_path: Path, vit_bundle: Path, suffix: str) -> None:
    out = tmp_path / f"exported{suffix}"
    assert main(["index", "export", str(out), "--db", str(odd.db)]) == 0
    fresh = tmp_path / "fresh.db"
    assert main(["index", "import", str(out), "--db", str(fresh), "--model", str(vit_bundle)]) == 0
    sql = "SELECT f.path, e.vector FROM files f JOIN embeddings e ON e.file_id = f.id"
    conn_a, conn_b = sqlite3.connect(odd.db), sqlite3.connect(fresh)
    conn_a.text_factory = conn_b.text_factory = bytes
    original, imported = dict(conn_a.execute(sql).fetchall()), dict(conn_b.execute(sql).fetchall())
    conn_a.close()
    conn_b.close()
    assert set(imported) == odd.embedded
    for path, vector in original.items():
        np.testing.assert_array_equal(np.frombuffer(imported[path], "<f4"), np.frombuffer(vector, "<f4"))


def test_clipitems_export_keeps_names_exact(odd: Odd, tmp_path: Path) -> None:
    # ClipItems holds the 512-d vectors of the robot's model: a library of 512-d vectors for the same files.
    library_of_dim(tmp_path / "lib512.db", [from_bytes(p) for p in sorted(odd.embedded)], 512)
    out = tmp_path / "clip.db"
    assert main(["index", "export", str(out), "--db", str(tmp_path / "lib512.db")]) == 0
    # The robot's node opens the url column's bytes as the file name, and skips a url it holds byte for byte.
    assert stored_paths(out, "SELECT url FROM ClipItems") == odd.embedded
    assert stored_paths(out, "SELECT name FROM ClipItems") == {p.rsplit(b"/", 1)[1] for p in odd.embedded}


def test_remove_a_folder_with_an_odd_name(odd: Odd, tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    with contextlib.closing(sqlite3.connect(odd.db)) as src, contextlib.closing(sqlite3.connect(db)) as dst:
        src.backup(dst)
    assert main(["index", "remove", from_bytes(odd.odd_root), "--db", str(db)]) == 0
    assert stored_paths(db, "SELECT path FROM roots") == {odd.photos}
    assert stored_paths(db) == (odd.embedded | {odd.broken}) - {join(odd.odd_root, b"plain.jpg")}


@pytest.mark.parametrize(
    ("name", "printed"),
    [
        ("/p/plain.jpg", "/p/plain.jpg"),
        ('/p/it\'s a "quote" $x.jpg', '/p/it\'s a "quote" $x.jpg'),
        ("/p/two\nlines.jpg", "$'/p/two\\nlines.jpg'"),
        ("/p/it's\t.jpg", "$'/p/it\\'s\\t.jpg'"),
        (from_bytes(b"/p/caf\xe9.jpg"), "$'/p/caf\\xe9.jpg'"),
        ("/p/a\u202egpj.exe", "$'/p/a\\xe2\\x80\\xaegpj.exe'"),
        ("$'x'", "$'$\\'x\\''"),
        ("/p/back\\slash\x7f", "$'/p/back\\\\slash\\x7f'"),
    ],
)
def test_quote_path_table(name: str, printed: str) -> None:
    assert quote_path(name) == printed
    assert as_bash_reads_it(printed) == to_bytes(name)


def test_the_gallery_serves_every_name(odd: Odd, vit_bundle: Path, tmp_path: Path) -> None:
    import requests

    import clipworks
    from clipworks.service import ServiceSettings, create_app, gallery
    from conftest import serve_app

    settings = ServiceSettings(tags=["dog"], tags_cache_dir=tmp_path / "tags")
    model = clipworks.load(vit_bundle)
    with Library(odd.db, model) as library:
        app = create_app(settings, model=model, library=library, routers=[gallery.router])
        with serve_app(app) as url:
            r = requests.get(f"{url}/api/search", params={"q": "a photo", "k": 100}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.content.isascii()  # undecodable bytes travel as \udcXX escapes, as in the CLI's --json
            hits = r.json()["results"]
            assert {os.fsencode(hit["path"]) for hit in hits} == odd.embedded
            for hit in hits:
                assert requests.get(url + hit["original"], timeout=60).status_code == 200, hit["path"]
