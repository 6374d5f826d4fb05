"""The threaded pipeline: input order, skipped files, bounded window, output formats."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipworks
from clipworks.errors import ClipworksError, UsageError
from clipworks.outputs import read_embeddings, write_embeddings
from clipworks.pipeline import collect_image_files, embed_files, iter_embeddings


def _bad_files(folder: Path, photo: Path) -> dict[str, Path]:
    """One of each kind of unreadable file the pipeline must survive."""
    bad = {
        "zero-bytes": folder / "empty.jpg",
        "not-an-image": folder / "notes.png",
        "truncated": folder / "cut.jpg",
        "bomb": folder / "bomb.png",
    }
    bad["zero-bytes"].write_bytes(b"")
    bad["not-an-image"].write_text("just some text, not a picture")
    bad["truncated"].write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    # A valid PNG header that declares 100000 x 100000 pixels: a decompression bomb.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bad["bomb"].write_bytes(
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    return bad


@pytest.fixture
def library(tmp_path: Path, photos: list[Path]) -> tuple[Path, list[Path], dict[str, Path]]:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    good = []
    for i, p in enumerate(photos[:6]):
        dest = (folder / "sub" if i % 2 else folder) / f"{i:02d}_{p.name}"
        shutil.copy(p, dest)
        good.append(dest)
    shutil.copy(photos[0], folder / ".hidden" / "secret.jpg")
    shutil.copy(photos[0], folder / "UPPER.JPG")
    good.append(folder / "UPPER.JPG")
    (folder / "readme.txt").write_text("not an image extension: ignored")
    return folder, good, _bad_files(folder, photos[0])


def test_collect_walks_recursively_and_skips_hidden(library) -> None:
    folder, good, bad = library
    found = collect_image_files([folder])
    assert set(found) == set(good) | set(bad.values())
    assert not any(".hidden" in str(p) for p in found)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images found"),
    ],
)
def test_collect_refuses_missing_and_empty(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        collect_image_files([make(tmp_path)])


def test_bad_files_are_skipped_counted_and_named(vit_bundle: Path, library, capsys) -> None:
    folder, good, bad = library
    model = clipworks.load(vit_bundle)
    files = collect_image_files([folder])
    skipped = []
    result = embed_files(model, files, batch_size=3, workers=2, progress=False, on_skip=skipped.append)
    assert sorted(result.paths) == sorted(str(p) for p in good)
    assert {f.path for f in skipped} == {str(p) for p in bad.values()}
    assert all(Path(f.path).name in f.error for f in skipped)  # each message names its file
    assert "4 skipped" in result.summary() and "images/s" in result.summary()


def test_pipeline_keeps_input_order_and_matches_direct_encoding(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    order = [photos[i % len(photos)] for i in (3, 0, 5, 1, 1, 4, 2, 0, 5)]
    result = embed_files(model, order, batch_size=4, workers=3, queue_size=5, progress=False)
    assert result.paths == [str(p) for p in order]
    np.testing.assert_allclose(result.embeddings, model.encode_images(order), atol=1e-5)


def test_batches_come_out_as_they_are_encoded(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    sizes = [len(b.paths) for b in iter_embeddings(model, photos[:5], batch_size=2, on_skip=lambda f: None)]
    assert sizes == [2, 2, 1]


@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".parquet"])
def test_output_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    # Names as os.fsdecode gives them: one with bytes that are not UTF-8, one with a newline.
    paths = ["a.jpg", "dir/b ü.png", "c.webp", os.fsdecode(b"\xff\xfe.jpg"), "two\nlines.jpg"]
    emb = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    written = write_embeddings(tmp_path / f"out{suffix}", paths, emb)
    assert written[0].is_file()
    got_paths, got = read_embeddings(tmp_path / f"out{suffix}")
    assert got_paths == paths
    np.testing.assert_array_equal(got, emb)


def test_pkl_is_sophgo_format(tmp_path: Path) -> None:
    emb = np.eye(2, 4, dtype=np.float32)
    write_embeddings(tmp_path / "embeddings.pkl", ["x.jpg", "y.jpg"], emb)
    data = pickle.loads((tmp_path / "embeddings.pkl").read_bytes())
    assert data["img_path"] == ["x.jpg", "y.jpg"]
    assert isinstance(data["embedding"], list) and data["embedding"][0].dtype == np.float32
    assert data["embedding"][0].shape == (4,)


@pytest.mark.parametrize(("name", "message"), [("out.csv", "must end in"), ("nodir/out.pkl", "does not exist")])
def test_bad_output_paths(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        write_embeddings(tmp_path / name, [], np.zeros((0, 4), np.float32))


def test_npy_and_its_paths_from_different_runs_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_embeddings(tmp_path / "a.npy", ["x.jpg", "y.jpg"], rng.standard_normal((2, 4)))
    write_embeddings(tmp_path / "b.npy", ["y.jpg", "x.jpg"], rng.standard_normal((2, 4)))
    shutil.copy(tmp_path / "b.paths.json", tmp_path / "a.paths.json")  # same count, other run
    with pytest.raises(ClipworksError, match=r"does not belong to a\.npy"):
        read_embeddings(tmp_path / "a.npy")


# Writes past the limit fail with EFBIG, as they would on a full disk; SIGXFSZ is ignored so they fail, not kill.
FULL_DISK = """
import resource, signal, sys
import numpy as np
from clipworks.outputs import write_embeddings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    vectors = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)  # does not compress
    write_embeddings(sys.argv[1], [f"new{i}.jpg" for i in range(64)], vectors)
except OSError:
    print("failed")
"""


def test_a_full_disk_leaves_the_old_npy_and_paths_whole(tmp_path: Path) -> None:
    out = tmp_path / "e.npy"
    write_embeddings(out, ["old.jpg"], np.zeros((1, 512), np.float32))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    src = str(Path(clipworks.__file__).parents[1])  # the clipworks under test, in the child process too
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(out)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": src}, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == "failed", proc.stderr  # EFBIG part-way through
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the old pair, and no temporary files
    assert read_embeddings(out)[0] == ["old.jpg"]


def test_encode_images_takes_one_image_or_many(vit_bundle: Path, photos) -> None:
    from PIL import Image

    model = clipworks.load(vit_bundle)
    want = model.encode_images([photos[0]])
    for one in (str(photos[0]), photos[0], photos[0].read_bytes(), Image.open(photos[0])):
        np.testing.assert_allclose(model.encode_images(one), want, atol=1e-6)
    with pytest.raises(TypeError, match="an image or an iterable of images"):
        model.encode_images(42)


# -- the one pipeline core ---------------------------------------------------------------------------


def _no_worker_left(name: str) -> bool:
    import threading

    return not any(t.name.startswith(name) and t.is_alive() for t in threading.enumerate())


def test_results_come_in_input_order_whichever_worker_finishes_first() -> None:
    import time

    from clipworks.pipeline import Pipeline

    delays = [0.05, 0.0, 0.03, 0.0, 0.02, 0.0, 0.04, 0.01]  # later items finish first

    def work(i: int) -> int:
        time.sleep(delays[i])
        return i * 10

    assert list(Pipeline(work, range(len(delays)), workers=4, window=3, name="t-order")) == [i * 10 for i in range(8)]
    assert _no_worker_left("t-order")


@pytest.mark.parametrize("workers", [1, 3])
def test_at_most_window_items_are_ahead_of_a_slow_consumer(workers: int) -> None:
    import threading
    import time

    from clipworks.pipeline import Pipeline

    lock = threading.Lock()
    started = 0
    consumed = 0
    ahead = []

    def work(i: int) -> int:
        nonlocal started
        with lock:
            started += 1
            ahead.append(started - consumed)
        return i

    for _ in Pipeline(work, range(40), workers=workers, window=5, name="t-window"):
        with lock:
            consumed += 1
        time.sleep(0.005)  # the consumer is the slow end
    assert max(ahead) <= 5 and consumed == 40


def _failing_items(at: int, closed_in: list[str]):
    import threading

    try:
        for i in range(100):
            if i == at:
                raise OSError(f"item {i} cannot be read")
            yield i
    finally:
        closed_in.append(threading.current_thread().name)


@pytest.mark.parametrize("where", ["items", "work"])
def test_a_failure_comes_after_the_results_before_it(where: str) -> None:
    from clipworks.pipeline import Pipeline

    def work(i: int) -> int:
        if where == "work" and i == 7:
            raise OSError("item 7 cannot be read")
        return i

    closed_in: list[str] = []
    got: list[int] = []
    with pytest.raises(OSError, match="item 7 cannot be read"):
        for value in Pipeline(work, _failing_items(7 if where == "items" else -1, closed_in), workers=2,
                              window=4, name="t-fail"):  # fmt: skip
            got.append(value)
    assert got == list(range(7))
    assert _no_worker_left("t-fail")
    assert closed_in and closed_in[0].startswith("t-fail")  # the generator is closed by a worker, not the consumer


@pytest.mark.parametrize("how", ["break", "interrupt", "cancel"])
def test_stopping_ends_the_workers_after_their_current_item(how: str) -> None:
    """A consumer that stops (a break, Ctrl-C, another thread's cancel) does not wait for the window to drain."""
    import threading
    import time

    from clipworks.pipeline import Pipeline

    cancel = threading.Event()
    done: list[int] = []

    def work(i: int) -> int:
        time.sleep(0.1)
        done.append(i)
        return i

    closed_in: list[str] = []
    pipeline = Pipeline(work, _failing_items(-1, closed_in), workers=2, window=40, cancel=cancel, name="t-stop")
    start = time.perf_counter()
    got = []
    try:
        for value in pipeline:
            got.append(value)
            if how == "break":
                break
            if how == "interrupt":
                raise KeyboardInterrupt
            if how == "cancel":
                threading.Timer(0, cancel.set).start()
    except KeyboardInterrupt:
        pass
    assert _no_worker_left("t-stop")
    assert time.perf_counter() - start < 1.5  # 40 items ahead at 0.1 s on 2 workers would take 2 s
    assert len(done) <= 6 and got[0] == 0
    assert closed_in and closed_in[0].startswith("t-stop")
    assert not cancel.is_set() or how == "cancel"  # close() never sets the caller's event


def test_latest_hand_over_keeps_the_newest_result_and_counts_the_rest() -> None:
    import time

    from clipworks.pipeline import Pipeline

    def produce():
        for i in range(30):
            time.sleep(0.01)
            yield i

    pipeline = Pipeline(lambda i: i, produce(), latest=True, name="t-latest").start()
    got = []
    while not pipeline.done:
        value = pipeline.poll(timeout=1.0)
        if value is not None:
            got.append(value)
        time.sleep(0.05)  # five items arrive for every one taken
    pipeline.close()
    assert got[-1] == 29 and got == sorted(set(got))  # the newest, never an older one after a newer
    assert len(got) < 30 and pipeline.dropped == 30 - len(got)  # the rest dropped, and counted


def test_the_per_item_hook_runs_in_the_decode_thread_and_its_values_come_back(vit_bundle: Path, library) -> None:
    import threading

    _, good, bad = library
    model = clipworks.load(vit_bundle)
    files = [good[0], bad["truncated"], good[1], bad["zero-bytes"], good[2]]

    def hook(path: object) -> tuple[str, str]:
        return Path(str(path)).name, threading.current_thread().name

    batches = list(iter_embeddings(model, files, batch_size=2, workers=2, on_item=hook, on_skip=lambda f: None))
    extras = [e for b in batches for e in b.extras]
    assert [name for name, _ in extras] == [good[0].name, good[1].name, good[2].name]  # one a row, in order
    failed = [f.extra for b in batches for f in b.failures]
    assert [name for name, _ in failed] == [bad["truncated"].name, bad["zero-bytes"].name]
    assert all(thread.startswith("clipworks-decode") for _, thread in extras + failed)


def test_cancel_ends_embedding_after_the_items_in_flight(vit_bundle: Path, photos) -> None:
    import threading

    model = clipworks.load(vit_bundle)
    cancel = threading.Event()
    seen = 0

    def progress(n: int) -> None:
        nonlocal seen
        seen += n
        if seen == 3:
            cancel.set()

    many = [photos[i % len(photos)] for i in range(200)]
    batches = list(iter_embeddings(model, many, batch_size=2, workers=2, queue_size=4, cancel=cancel,
                                   on_progress=progress))  # fmt: skip
    embedded = sum(len(b.paths) for b in batches)
    assert 3 <= embedded <= 4 + 2  # what was decoded when the event was set, not the 200
    assert _no_worker_left("clipworks-decode")


# -- one walk, one extension set -------------------------------------------------------------------


def test_embed_images_and_the_library_walk_find_the_same_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every extension the library indexes (HEIC with pillow-heif, AVIF where Pillow reads it) is embedded too."""
    from clipworks.library.scan import image_extensions, walk

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    # A stem per extension: a RAW beside a JPEG of its name is walked as the JPEG only (test_library_raw.py).
    names = [f"{ext[1:]}{ext}" for ext in sorted(image_extensions())] + ["b.HEIC", "c.avif", "d.AVIF", "e.txt", "f.mp4"]
    for name in names:
        (folder / name).write_bytes(b"x")
        (folder / "sub" / name).write_bytes(b"x")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "g.jpg").write_bytes(b"x")
    (folder / "locked").mkdir()
    (folder / "locked").chmod(0)
    try:
        monkeypatch.chdir(tmp_path)
        found = collect_image_files([Path("photos")])
        library = sorted(Path(s.path) for s in walk(str(folder)))
    finally:
        (folder / "locked").chmod(0o755)
    assert [tmp_path / p for p in found] == library  # the same files, in the same order
    assert all(not p.is_absolute() for p in found)  # named as the user gave the folder
    assert {p.suffix.lower() for p in found} == set(image_extensions())
    if os.geteuid() != 0:  # root lists any folder
        assert "skipped folder photos/locked" in capsys.readouterr().err


def test_the_pipeline_stops_ort_threads_spinning_unless_told(vit_bundle: Path, photos) -> None:
    """Decoder threads share the cores with ONNX Runtime's: its threads must not spin between ops there.
    A model used alone keeps spinning, and an explicit setting is kept either way."""
    from clipworks.runtime.sessions import RuntimeSettings

    key = "session.intra_op.allow_spinning"
    alone = clipworks.load(vit_bundle)
    alone.encode_images(photos[:1])
    assert alone.visual.applied_options()["session_config"][key] == "1"
    for runtime, expected in ((None, "0"), (RuntimeSettings(allow_spinning=True), "1")):
        model = clipworks.load(vit_bundle, runtime=runtime)
        assert [len(b.keys) for b in iter_embeddings(model, photos[:2], batch_size=2, workers=2)] == [2]
        assert model.visual.applied_options()["session_config"][key] == expected
