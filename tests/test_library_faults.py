"""Faults of the library file and its disk: read-only, full, damaged, and a model that is no longer the one.

Each fault is made for real where the machine allows: a small tmpfs of the test's own, filled or remounted
read-only, a single file bind-mounted read-only, pages of a real database overwritten, a bundle exported
again with other weights. Every command then ends with one ``error: ...`` line saying what to do, a
non-zero exit, and the stored vectors intact; a read-only library can still be searched.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import pickle
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.library import Library
from clipworks.library.store import Revision, Store
from conftest import MODEL_CONFIGS
from library_helpers import copy_photos, library_of_dim, make_variants, stored_vectors


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def backup(db: Path, copy: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _unmount(target: Path | str) -> None:
    gc.collect()  # connections the CLI left to the garbage collector hold files open
    if subprocess.run(["umount", str(target)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(target)], check=True)  # detach now, never leave a mount behind


class Disk:
    """A 2 MiB file system of the test's own: a tmpfs that can be filled and remounted read-only.

    Where mounting is not allowed the faults are made one layer up instead: read-only through the mode
    bits (or, for root, whom they do not stop, through ``os.access``, which the library asks before it
    opens a file for writing), and full through SQLite's ``max_page_count``, which fails a growing
    database with the same "database or disk is full".
    """

    SIZE = 2 << 20

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.monkeypatch = monkeypatch
        folder.mkdir()
        self.mounted = _mount("-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(folder))
        self.bound: list[Path] = []
        self.denied: set[str] = set()
        self.page_limit = False

    def read_only(self, target: Path | None = None) -> None:
        """The whole disk read-only, or only the file ``target`` on it."""
        if self.mounted:
            if target is None:
                assert _mount("-o", "remount,ro", str(self.folder))
            else:
                assert _mount("--bind", str(target), str(target))
                assert _mount("-o", "remount,bind,ro", str(target))
                self.bound.append(target)
        elif os.geteuid() != 0:
            for path in [target] if target else [self.folder, *self.folder.iterdir()]:
                path.chmod(path.stat().st_mode & ~0o222)
        else:
            self._deny_writes(target or self.folder)

    def _deny_writes(self, target: Path) -> None:
        if not self.denied:
            real = os.access

            def access(path: object, mode: int, *args: object, **kw: object) -> bool:
                if mode & os.W_OK and any(os.path.abspath(str(path)).startswith(d) for d in self.denied):
                    return False
                return real(path, mode, *args, **kw)  # type: ignore[arg-type]

            self.monkeypatch.setattr(os, "access", access)
        self.denied.add(str(target))

    def fill(self, leave: int) -> None:
        """Fill the disk up to ``leave`` free bytes."""
        if not self.mounted:
            self._limit_pages()
            return
        info = os.statvfs(self.folder)
        with open(self.folder / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            fh.write(b"\0" * max(0, info.f_bavail * info.f_frsize - leave))

    def _limit_pages(self) -> None:
        real = Store._connect

        def connect(store: Store) -> sqlite3.Connection:
            conn = real(store)
            if self.page_limit:
                pages = os.path.getsize(store.path) // 4096
                conn.execute(f"PRAGMA max_page_count = {pages + 2}")
            return conn

        self.page_limit = True
        self.monkeypatch.setattr(Store, "_connect", connect)

    def free(self) -> None:
        self.page_limit = False
        (self.folder / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        for target in self.bound:
            _unmount(target)
        if self.mounted:
            _unmount(self.folder)
        elif os.geteuid() != 0:
            for path in [self.folder, *self.folder.iterdir()]:
                path.chmod(path.stat().st_mode | 0o200)


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    disk = Disk(tmp_path / "disk", monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


@pytest.fixture
def folder(tmp_path: Path, photos: list[Path]) -> Path:
    return copy_photos(photos, tmp_path / "photos")


def index(db: Path, folder: Path, bundle: Path) -> dict[str, np.ndarray]:
    """Index ``folder`` into ``db`` and close it (the WAL folds into the file); returns the stored vectors."""
    with Library(db, str(bundle), create=True) as lib:
        lib.index([folder])
    shutil.rmtree(db.with_name(db.name + "-vectors"), ignore_errors=True)  # searches must read SQLite
    return stored_vectors(db)


def assert_same_vectors(db: Path, before: dict[str, np.ndarray]) -> None:
    after = stored_vectors(db)
    assert set(after) >= set(before)
    for path, vector in before.items():
        np.testing.assert_array_equal(after[path], vector)


# -- read-only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["read-only folder", "read-only file", "new file in a read-only folder"])
def test_index_add_on_a_read_only_library_says_so(
    capsys: pytest.CaptureFixture[str], disk: Disk, folder: Path, vit_bundle: Path, where: str
) -> None:
    db = disk.folder / "lib.db"
    index(db, folder, vit_bundle)
    make_variants([next(folder.iterdir())], folder / "new", 1)  # something to write
    before = digest(db)
    target = disk.folder / "sub" / "new.db" if where.startswith("new") else db
    disk.read_only(db if where == "read-only file" else None)
    code, _, err = run(capsys, "index", "add", folder, "--db", target, "--model", vit_bundle)
    assert code == 1
    line = one_error_line(err)
    assert str(target.parent if where.startswith("new") else target) in line
    assert "make it writable or use --db elsewhere" in line
    assert digest(db) == before and not target.with_name("new.db").exists()


@pytest.mark.parametrize("where", ["read-only folder", "read-only file", "read-only folder, commits in the -wal"])
def test_a_read_only_library_can_be_searched(
    capsys: pytest.CaptureFixture[str], disk: Disk, folder: Path, tmp_path: Path, vit_bundle: Path, where: str
) -> None:
    db = disk.folder / "lib.db"
    vectors = index(db, folder, vit_bundle)
    writable = tmp_path / "writable.db"  # the same library where it can be written: the expected results
    if not where.endswith("-wal"):
        backup(db, writable)
    else:
        # A copy taken while a writer had commits not yet folded into the file: they live in the -wal only.
        writer = Library(db, str(vit_bundle), create=True)
        writer.store.conn.execute("PRAGMA wal_autocheckpoint = 0")
        writer.index([make_variants([next(folder.iterdir())], tmp_path / "added", 2)[0].parent])
        vectors = stored_vectors(db)
        backup(db, writable)
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir()
        for name in ("lib.db", "lib.db-wal", "lib.db-shm"):
            shutil.copy(disk.folder / name, snapshot / name)
        writer.close()
        for name in ("lib.db", "lib.db-wal", "lib.db-shm"):
            shutil.copy(snapshot / name, disk.folder / name)
        assert (disk.folder / "lib.db-wal").stat().st_size > 0
    shutil.rmtree(db.with_name(db.name + "-vectors"), ignore_errors=True)
    code, expected, err = run(capsys, "search", "a", "dog", "--top-k", "50", "--db", writable)
    assert code == 0, err
    disk.read_only(db if where == "read-only file" else None)
    code, out, err = run(capsys, "search", "a", "dog", "--top-k", "50", "--db", db)
    assert code == 0, err
    assert out == expected and len(out.splitlines()) == len(vectors)
    code, out, err = run(capsys, "index", "status", "--db", db)
    assert code == 0 and f"{len(vectors)} files" in out, err
    exported = tmp_path / "out.pkl"
    assert run(capsys, "index", "export", exported, "--db", db)[0] == 0
    assert sorted(pickle.loads(exported.read_bytes())["img_path"]) == sorted(vectors)
    code, _, err = run(capsys, "index", "remove", folder, "--db", db)
    assert code == 1 and "make it writable or use --db elsewhere" in one_error_line(err)


# -- full disk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("leave", [64 << 10, 0], ids=["64 KiB left", "nothing left"])
def test_a_full_disk_loses_nothing(
    capsys: pytest.CaptureFixture[str],
    disk: Disk,
    folder: Path,
    photos: list[Path],
    tmp_path: Path,
    vit_bundle: Path,
    leave: int,
) -> None:
    db = disk.folder / "lib.db"
    before = index(db, folder, vit_bundle)
    # Many files with long names: the scan's one transaction needs more room than is left.
    more = tmp_path / "more"
    (more / ("deep-" * 20)).mkdir(parents=True)
    source = make_variants(photos[:1], tmp_path / "small", 1, size=32)[0]
    names = [more / ("deep-" * 20) / f"{'long-name-' * 15}{i:04d}.jpg" for i in range(400)]
    for name in names:
        shutil.copyfile(source, name)
    disk.fill(leave)
    code, _, err = run(capsys, "index", "add", more, "--db", db)
    assert code == 1
    line = one_error_line(err)
    assert str(db) in line and "is full" in line and "free some space" in line
    if leave == 0 and disk.mounted:  # (SQLite's page limit only stops a database from growing)
        code, _, err = run(capsys, "search", "a", "dog", "--db", db)
        assert code == 1 and "is full" in one_error_line(err)
    disk.free()
    gc.collect()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert_same_vectors(db, before)
    code, _, err = run(capsys, "index", "add", more, "--db", db)
    assert code == 0, err
    assert set(stored_vectors(db)) == set(before) | {str(n) for n in names}


# -- damaged files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_library(tmp_path_factory: pytest.TempPathFactory, vit_bundle: Path) -> tuple[Path, Path]:
    """A library of 3000 imported vectors (about 200 pages), closed, and the file it was imported from."""
    root = tmp_path_factory.mktemp("large")
    vectors = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    source = root / "vectors.pkl"
    source.write_bytes(pickle.dumps({"img_path": [f"/photos/{i:05d}.jpg" for i in range(3000)],
                                     "embedding": list(vectors)}))  # fmt: skip
    with Library(root / "lib.db", str(vit_bundle), create=True) as lib:
        lib.import_file(source)
    return root / "lib.db", source


def damage_pages(db: Path) -> None:
    pages = db.stat().st_size // 4096
    with db.open("r+b") as fh:
        for page in range(pages // 3, pages // 3 + 3):  # well past the header and the schema
            fh.seek(page * 4096)
            fh.write(np.random.default_rng(page).bytes(4096))


def damage_file_rows(db: Path) -> None:
    """Overwrite a page in the middle of the files table (where an index run writes without reading)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        leaves = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = 'files' AND pagetype = 'leaf'")]
    page = sorted(leaves)[len(leaves) // 2]
    with db.open("r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(np.random.default_rng(page).bytes(4096))


def damage_one_vector(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE embeddings SET vector = vector || zeroblob(64) WHERE file_id = 7")
        conn.commit()


def _commands(folder: Path, source: Path, out: Path, bundle: Path) -> dict[str, list[str | Path]]:
    return {
        "search": ["search", "a", "dog"],
        "duplicates": ["duplicates"],
        "status": ["index", "status"],
        "export": ["index", "export", out],
        "add": ["index", "add", folder, "--model", bundle],
        "import": ["index", "import", source, "--model", bundle],
    }


@pytest.mark.parametrize(
    ("damage", "command"),
    [(damage_pages, c) for c in ("search", "duplicates", "status", "export")]
    + [(damage_file_rows, c) for c in ("search", "status", "add", "import")]
    + [(damage_one_vector, c) for c in ("search", "duplicates", "export")],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_damaged_library_is_named_and_left_alone(
    capsys: pytest.CaptureFixture[str],
    large_library: tuple[Path, Path],
    folder: Path,
    tmp_path: Path,
    vit_bundle: Path,
    damage: Callable[[Path], None],
    command: str,
) -> None:
    db = tmp_path / "lib.db"
    shutil.copy(large_library[0], db)
    damage(db)
    before = digest(db)
    args = _commands(folder, large_library[1], tmp_path / "out.pkl", vit_bundle)[command]
    code, _, err = run(capsys, *args, "--db", db)
    assert code == 1
    line = one_error_line(err)
    assert f"{db} is damaged" in line and "restore it from a backup" in line
    gc.collect()
    assert digest(db) == before  # nothing written into it: what a recovery would save is still there
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert not (tmp_path / "out.pkl").exists()


# -- the model is no longer the one ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit48_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT with 48-d embeddings (the other tiny bundles make 32-d ones)."""
    from clipworks.export import export_model

    out = tmp_path_factory.mktemp("bundles") / "tiny-vit-48"
    export_model(str(MODEL_CONFIGS / "tiny-vit-48.json"), out, pretrained="random", log=lambda _: None)
    return out


@pytest.mark.parametrize("replacement", ["rn_bundle", "vit48_bundle"], ids=["other weights", "another dimension"])
@pytest.mark.parametrize("command", ["search", "similar", "add"])
def test_a_bundle_replaced_under_the_library_is_refused(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    folder: Path,
    photos: list[Path],
    vit_bundle: Path,
    replacement: str,
    command: str,
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(vit_bundle, bundle)
    db = tmp_path / "lib.db"
    before = index(db, folder, bundle)
    shutil.rmtree(bundle)
    shutil.copytree(request.getfixturevalue(replacement), bundle)  # exported again, to the same folder
    outside = make_variants(photos[:1], tmp_path / "outside", 1)[0]
    args = {"search": ["search", "a", "dog"], "similar": ["similar", outside], "add": ["index", "add", folder]}
    code, out, err = run(capsys, *args[command], "--db", db)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert f"{bundle} now holds" in line and "pass --model" in line
    assert_same_vectors(db, before)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 1
    code, _, err = run(capsys, "index", "export", tmp_path / "out.pkl", "--db", db)
    assert code == 0, err  # the stored vectors need no model to be exported


# -- the side file ------------------------------------------------------------------------------------


def test_a_side_file_that_does_not_fit_the_disk_leaves_the_matrix_in_memory(
    disk: Disk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 512-d vectors (6 MB) against a 2 MiB disk for the side file: the write fails with the disk's own
    error (a file mapped for writing would have been killed by SIGBUS at the first page past the end), the
    search holds the matrix in memory instead, and no half-written file stays behind."""
    import resource

    from clipworks.library.search import MatrixCache

    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/photos/{i:05d}.jpg" for i in range(3000)], 512)
    (tmp_path / "lib.db-vectors").symlink_to(disk.folder, target_is_directory=True)
    if not disk.mounted:  # no tmpfs here: a file size limit fails the write the same way (EFBIG)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (disk.SIZE, limit[1]))
        monkeypatch.setattr(disk, "close", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))
    with Store(db) as store:
        (model,) = store.models()
        index = MatrixCache(db, model).get(store)
        want_ids, want = store.live_vectors(model)
    assert not isinstance(index.matrix, np.memmap)
    np.testing.assert_array_equal(index.ids, want_ids)
    np.testing.assert_array_equal(index.matrix, want)
    assert [p.suffix for p in disk.folder.iterdir()] in ([], [".lock"])  # nothing half-written


def test_a_library_emptied_drops_its_old_side_file(tmp_path: Path) -> None:
    from clipworks.library.search import MatrixCache

    db = tmp_path / "lib.db"
    library_of_dim(db, [f"/photos/{i:05d}.jpg" for i in range(100)], 32)
    with Store(db) as store:
        (model,) = store.models()
        assert len(MatrixCache(db, model).get(store)) == 100
        (rows,) = (tmp_path / "lib.db-vectors").glob("*.f32")
        with store.write() as conn:
            conn.execute("UPDATE files SET deleted_at = 1")
        assert len(MatrixCache(db, model).get(store)) == 0
    assert not rows.exists()
    assert [p.stat().st_size for p in (tmp_path / "lib.db-vectors").glob("*.f32")] == [0]


def _ann_base(count: int = 3000, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((count, dim)).astype(np.float32)
    return np.arange(1, count + 1, dtype=np.int64), matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_an_ann_index_in_a_read_only_folder_is_updated_in_memory(disk: Disk) -> None:
    """A saved index one generation behind, on a read-only share: the search still answers from the index,
    updated for this process only, and nothing on the share changes."""
    from clipworks.library.ann import sync_ann
    from clipworks.library.search import ExactIndex

    ids, matrix = _ann_base()
    folder = disk.folder / "vectors"
    sync_ann(folder, Revision(1, 1, 11), 1, ExactIndex(ids[:-100], matrix[:-100]), "pq")
    before = {f.name: digest(f) for f in folder.iterdir()}
    disk.read_only()
    logs: list[str] = []
    ann = sync_ann(folder, Revision(1, 2, 12), 1, ExactIndex(ids, matrix), "pq", logs.append)
    assert logs[0] == f"ann index: {folder} cannot be written: the index is updated in memory, for this process only"
    assert logs[1] == "ann index: +100 -0 vectors (0 replaced)"
    assert ann.top_k(matrix[-1], 1)[0][0] == ids[-1]  # a photo only the in-memory update knows
    assert {f.name: digest(f) for f in folder.iterdir()} == before


def test_an_ann_index_that_does_not_fit_the_disk_is_one_line(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from clipworks.errors import ClipworksError
    from clipworks.library.ann import sync_ann
    from clipworks.library.search import ExactIndex

    ids, matrix = _ann_base(20_000, 64)  # an f32 graph of ~7 MB against a 2 MiB disk
    if disk.mounted:
        disk.fill(leave=0)
    else:  # no tmpfs here: a file size limit fails the write the same way (EFBIG)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
        monkeypatch.setattr(disk, "close", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))
    with pytest.raises(ClipworksError) as e:
        sync_ann(disk.folder / "vectors", Revision(1, 1, 11), 1, ExactIndex(ids, matrix), "f32")
    message = str(e.value)
    assert message.startswith(f"cannot save the search index in {disk.folder / 'vectors'} (")
    assert message.endswith("free some space, or search with --ann off") and "\n" not in message
    assert not [f for f in (disk.folder / "vectors").iterdir() if f.suffix != ".lock"]  # no temporary files left
