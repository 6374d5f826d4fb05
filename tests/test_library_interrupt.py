"""A killed or interrupted `clipworks index add` leaves a valid library that the next run completes; a second
run started while one is going waits for it instead of doing the same work."""

from __future__ import annotations

import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library_helpers import make_variants

IMAGES = 48


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("many")
    make_variants(photos, folder, IMAGES, size=960)  # big enough that embedding them takes a while
    return folder


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def _index(folder: Path, db: Path, bundle: Path) -> subprocess.Popen:
    args = ["index", "add", str(folder), "--db", str(db), "--model", str(bundle), "--batch-size", "2", "--workers", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "clipworks.cli.main", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop_after_first_commit(proc: subprocess.Popen, db: Path, sig: int) -> int:
    deadline = time.monotonic() + 60
    while _count(db) == 0:
        assert proc.poll() is None, f"index add ended before its first commit: {proc.communicate()}"
        assert time.monotonic() < deadline, "no commit within 60 s"
        time.sleep(0.005)
    assert proc.poll() is None, "index add finished before it could be stopped; use more images"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    return _count(db)


def _check_complete(db: Path, folder: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        paths = [p for (p,) in conn.execute("SELECT f.path FROM files f JOIN embeddings e ON e.file_id = f.id")]
    finally:
        conn.close()
    assert len(paths) == len(set(paths)) == IMAGES  # every image exactly once
    assert set(paths) == {str(p) for p in folder.iterdir()}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_index_resumes(tmp_path: Path, many_photos: Path, vit_bundle: Path, sig: int):
    db = tmp_path / "lib.db"
    proc = _index(many_photos, db, vit_bundle)
    kept = _stop_after_first_commit(proc, db, sig)
    assert 0 < kept < IMAGES, "the run should have been stopped midway"
    if sig == signal.SIGINT:
        err = proc.stderr.read()
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()

    rerun = _index(many_photos, db, vit_bundle)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert f"{IMAGES - kept} embedded" in err  # the committed ones were not embedded again
    _check_complete(db, many_photos)


def _embedded(stderr: str) -> int:
    found = re.search(r"(\d+) embedded", stderr)
    return int(found.group(1)) if found else 0


def _read_until(proc: subprocess.Popen, text: str, seconds: float) -> str:
    """Lines of ``proc``'s stderr up to the first holding ``text`` (all of them if it ends or time runs out)."""
    seen = ""
    deadline = time.monotonic() + seconds
    while text not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    return seen


def test_a_second_index_run_waits_for_the_first(tmp_path: Path, many_photos: Path, vit_bundle: Path):
    db = tmp_path / "lib.db"
    first = _index(many_photos, db, vit_bundle)
    second = None
    try:
        deadline = time.monotonic() + 60
        while _count(db) == 0:
            assert first.poll() is None, f"index add ended before its first commit: {first.communicate()}"
            assert time.monotonic() < deadline, "no commit within 60 s"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)  # mid-run, holding the library, for as long as the second one starts
        second = _index(many_photos, db, vit_bundle)
        waiting = _read_until(second, "waiting for another index run", 120)
        os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
        _, rest = second.communicate(timeout=300)
    finally:  # a failed assertion above must not leave a stopped process behind
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    second_err = waiting + rest
    assert first.returncode == 0 and second.returncode == 0, (first_err, second_err)
    assert f"waiting for another index run on {db} (pid {first.pid})" in waiting
    # Every photo embedded once, by the first run; the second found the work done.
    assert (_embedded(first_err), _embedded(second_err)) == (IMAGES, 0)
    assert f"{IMAGES} unchanged" in second_err
    _check_complete(db, many_photos)
