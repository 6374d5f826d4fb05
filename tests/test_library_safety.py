"""What the library indexes and the gallery serves when folders hold symlinks, swapped files and FIFOs.

The policy: a symlink to a file is followed when its target is a regular file (and it must decode as an
image to be searched or served); a symlinked folder is followed only inside the indexed folder unless
``follow_links`` is on; the gallery serves a file only if it is, at open time, the regular file the index
recorded (device and inode), with the content type of its decoded format.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipworks.library import Library
from clipworks.library.store import MIGRATIONS, SCHEMA_VERSION, Store
from clipworks.service import ServiceSettings, create_app, gallery
from library_helpers import file_ids, make_variants

SECRET = b"root:x:0:0:the secret that must never be served\n" * 20


@pytest.fixture(scope="module")
def model(vit_bundle: Path):  # type: ignore[no-untyped-def]
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "cache"))


class Tree:
    """A library folder beside an "outside" folder; every photo is a small distinct real image."""

    def __init__(self, tmp_path: Path, photos: list[Path]) -> None:
        self.root = tmp_path / "photos"
        self.outside = tmp_path / "outside"
        images = make_variants(photos, tmp_path / "made", 12, size=96)
        self.spare = images[8:]  # images never indexed, to swap in
        self.root.mkdir()
        (self.root / "sub").mkdir()
        (self.outside / "album").mkdir(parents=True)
        for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "sub/e.jpg"]):
            shutil.copy(images[i], self.root / name)
        Image.open(images[5]).save(self.root / "png-named.jpg", "PNG")  # the name says JPEG, the bytes PNG
        shutil.copy(images[6], self.outside / "photo.jpg")
        shutil.copy(images[7], self.outside / "album" / "f.jpg")
        (self.outside / "passwd").write_bytes(SECRET)
        os.symlink(self.outside / "passwd", self.root / "secret.jpg")  # a link to a file that is no image
        os.symlink(self.outside / "photo.jpg", self.root / "linked.jpg")  # a link to a photo on another disk
        os.symlink(self.outside / "album", self.root / "album")  # a folder outside the library
        os.symlink(self.root / "sub", self.root / "also-sub")  # a folder inside it: walked once
        os.mkfifo(self.root / "fifo.jpg")

    def path(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture
def tree(tmp_path: Path, photos: list[Path]) -> Tree:
    return Tree(tmp_path, photos)


def indexed(lib: Library) -> dict[str, tuple[str | None, bool]]:
    """Path -> (decode error, has a vector) of every present row."""
    conn = sqlite3.connect(lib.path)
    try:
        rows = conn.execute(
            "SELECT f.path, f.error, e.file_id IS NOT NULL FROM files f LEFT JOIN embeddings e ON e.file_id = f.id "
            "WHERE f.deleted_at IS NULL"
        ).fetchall()
    finally:
        conn.close()
    return {p: (err, bool(v)) for p, err, v in rows}


# -- index time -------------------------------------------------------------------------------------


def test_links_followed_only_to_regular_files_and_to_folders_inside(tmp_path: Path, tree: Tree, model) -> None:
    lib = Library(tmp_path / "lib.db", model, create=True)
    report = lib.index([tree.root])
    found = indexed(lib)
    # The folder outside is not indexed, and the report says which link was not followed.
    assert not [p for p in found if "/album/" in p]
    assert [(f.path, f.kind, f.detail) for f in report.skipped_folders] == [
        (tree.path("album"), "outside", str(tree.outside / "album"))
    ]
    photos = {tree.path(n) for n in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "png-named.jpg", "linked.jpg"]}
    assert photos <= set(found) and all(found[p] == (None, True) for p in photos)
    # sub/ is walked once, by its own name (links are walked last); the FIFO is no regular file.
    assert [p for p in found if p.endswith("/e.jpg")] == [tree.path("sub/e.jpg")]
    assert tree.path("fifo.jpg") not in found
    # The link to a non-image is recorded as unreadable: never searched, never served.
    err, vector = found[tree.path("secret.jpg")]
    assert err is not None and not vector

    followed = lib.index([tree.root], follow_links=True)
    assert followed.new == 1 and tree.path("album/f.jpg") in indexed(lib)
    assert lib.index([tree.root]).scanned == followed.scanned  # the choice is remembered for the folder
    back = lib.index([tree.root], follow_links=False)
    assert back.deleted == 1 and tree.path("album/f.jpg") not in indexed(lib)


# -- serve time -------------------------------------------------------------------------------------


# Each swap changes the library folder after indexing and returns (the indexed name it hit, whether that
# name is served again once the next index run has recorded the new file).


def _swap_for_link_to_secret(tree: Tree) -> tuple[str, bool]:
    os.unlink(tree.path("a.jpg"))
    os.symlink(tree.outside / "passwd", tree.path("a.jpg"))
    return "a.jpg", False  # re-indexed, it does not decode: never served


def _swap_for_link_to_image(tree: Tree) -> tuple[str, bool]:
    os.unlink(tree.path("a.jpg"))
    os.symlink(tree.spare[0], tree.path("a.jpg"))
    return "a.jpg", True


def _swap_for_hard_link(tree: Tree) -> tuple[str, bool]:
    private = tree.outside / "private.jpg"
    shutil.copy(tree.spare[0], private)
    os.link(private, tree.root / "tmp-link")
    os.replace(tree.root / "tmp-link", tree.path("b.jpg"))
    return "b.jpg", True


def _swap_for_other_file(tree: Tree) -> tuple[str, bool]:
    shutil.copy(tree.spare[1], tree.root / "tmp-copy")
    os.replace(tree.root / "tmp-copy", tree.path("c.jpg"))
    return "c.jpg", True


def _swap_folder_for_link_outside(tree: Tree) -> tuple[str, bool]:
    (tree.outside / "fake").mkdir()
    shutil.copy(tree.spare[2], tree.outside / "fake" / "e.jpg")
    (tree.root / "sub").rename(tree.outside / "moved-sub")
    os.symlink(tree.outside / "fake", tree.root / "sub")
    return "sub/e.jpg", False  # a link out of the folder is not followed


def _swap_link_target(tree: Tree) -> tuple[str, bool]:
    os.unlink(tree.outside / "photo.jpg")
    shutil.copy(tree.spare[3], tree.outside / "photo.jpg")
    return "linked.jpg", True


def gallery_client(tmp_path: Path, model, lib: Library) -> TestClient:  # type: ignore[no-untyped-def]
    settings = ServiceSettings(tags=["dog"], tags_cache_dir=tmp_path / "tags")
    return TestClient(create_app(settings, model=model, library=lib, routers=[gallery.router]))


@pytest.mark.parametrize(
    "swap",
    [
        _swap_for_link_to_secret,
        _swap_for_link_to_image,
        _swap_for_hard_link,
        _swap_for_other_file,
        _swap_folder_for_link_outside,
        _swap_link_target,
    ],
    ids=["link-to-secret", "link-to-image", "hard-link", "other-file", "folder-to-outside", "link-target"],
)
def test_a_file_swapped_after_indexing_is_not_served(tmp_path: Path, tree: Tree, model, swap: Callable) -> None:
    lib = Library(tmp_path / "lib.db", model, create=True)
    lib.index([tree.root])
    name, served_after_reindex = swap(tree)
    file_id = file_ids(lib.path)[tree.path(name)]
    with gallery_client(tmp_path, model, lib) as c:
        for url in (f"/original/{file_id}", f"/thumb/{file_id}"):
            r = c.get(url)
            assert r.status_code == 404, (url, r.status_code)
            assert "replaced" in r.json()["detail"] or "link" in r.json()["detail"], r.json()
            assert SECRET[:20] not in r.content
        # The next index run records the new file: then it is served, as what it is now, or not at all.
        lib.index([tree.root])
        r = c.get(f"/original/{file_id}")
        if served_after_reindex:
            assert r.status_code == 200 and r.content == Path(tree.path(name)).read_bytes()
        else:
            assert r.status_code == 404 and SECRET[:20] not in r.content


def test_served_files_are_indexed_images_typed_by_their_format(tmp_path: Path, tree: Tree, model) -> None:
    lib = Library(tmp_path / "lib.db", model, create=True)
    lib.index([tree.root])
    ids = file_ids(lib.path)
    with gallery_client(tmp_path, model, lib) as c:
        for name, kind in [("png-named.jpg", "image/png"), ("a.jpg", "image/jpeg"), ("linked.jpg", "image/jpeg")]:
            r = c.get(f"/original/{ids[tree.path(name)]}")
            assert r.status_code == 200, (name, r.text)
            assert r.headers["content-type"] == kind, name  # from the decoded format, not the name
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.content == Path(tree.path(name)).read_bytes()
            assert c.get(f"/thumb/{ids[tree.path(name)]}").status_code == 200

        secret = c.get(f"/original/{ids[tree.path('secret.jpg')]}")  # indexed, as unreadable
        assert secret.status_code == 404 and SECRET[:20] not in secret.content

        os.unlink(tree.path("d.jpg"))
        os.mkfifo(tree.path("d.jpg"))  # a FIFO swapped in: refused at once, not a server stuck in open()
        assert c.get(f"/original/{ids[tree.path('d.jpg')]}").status_code == 404

    lib.index([tree.root], follow_links=True)  # the owner chose to follow links out of the folder
    with gallery_client(tmp_path, model, lib) as c:
        r = c.get(f"/original/{file_ids(lib.path)[tree.path('album/f.jpg')]}")
        assert r.status_code == 200 and r.content == (tree.outside / "album" / "f.jpg").read_bytes()


# -- a library from before identities were recorded -----------------------------------------------


def test_an_upgraded_library_serves_after_the_next_index_run(tmp_path: Path, tree: Tree, model) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    st = os.stat(tree.path("a.jpg"))
    conn.execute(
        "INSERT INTO files (path, size, mtime_ns, updated_at) VALUES (?, ?, ?, 0)",
        (tree.path("a.jpg"), st.st_size, st.st_mtime_ns),
    )
    conn.close()
    with Store(db) as store:
        assert store.version == SCHEMA_VERSION
        library_id, generation, _ = store.revision()
        assert library_id > 0 and generation == 0
    with Store(db) as store:
        assert store.revision().library_id == library_id  # made once, by the migration
    lib = Library(db, model)
    file_id = file_ids(db)[tree.path("a.jpg")]
    with gallery_client(tmp_path, model, lib) as c:
        r = c.get(f"/original/{file_id}")
        assert r.status_code == 404 and "index add" in r.json()["detail"]  # no identity recorded yet
        report = lib.index([tree.root])
        assert report.changed == 0  # the known file is kept (its identity filled in), not re-embedded as new
        assert c.get(f"/original/{file_id}").status_code == 200


# -- the CLI: unreadable folders and links not followed are named on stderr --------------------------


def _unprivileged(cmd: list[str]) -> list[str]:
    """Root reads a mode-000 folder anyway; drop the capabilities that let it, so permissions apply."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    assert setpriv, "as root this test needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE"
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *cmd]


def test_cli_warns_of_unreadable_folders_and_keeps_their_photos(tmp_path: Path, tree: Tree, vit_bundle) -> None:
    db = tmp_path / "lib.db"
    index = [sys.executable, "-m", "clipworks.cli.main", "index", "add", str(tree.root), "--db", str(db),
             "--model", str(vit_bundle)]  # fmt: skip
    first = subprocess.run(index, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = file_ids(db)
    locked = tree.root / "sub"
    locked.chmod(0)
    try:
        second = subprocess.run(_unprivileged(index), capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert second.returncode == 0, second.stderr
    warnings = [line for line in second.stderr.splitlines() if line.startswith("warning:")]
    unreadable = [w for w in warnings if str(locked) in w and "cannot read folder" in w]
    assert len(unreadable) == 1, second.stderr
    assert [w for w in warnings if "not following" in w and str(tree.root / "album") in w], second.stderr
    assert "deleted" not in second.stderr  # its photos are not taken for gone
    assert {p for p in before if "/sub/" in p or "/also-sub/" in p} <= set(file_ids(db))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM files WHERE deleted_at IS NOT NULL").fetchone()[0] == 0
