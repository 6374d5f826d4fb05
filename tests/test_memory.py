"""Peak memory of whole runs on very elongated images: the CLI, the library and the HTTP service.

A 40000x1 PNG or a 1x40000 GIF is a few hundred bytes, and open_clip's transform would resize it to
8960000x224 pixels before cropping (13 GB of RSS for one file at 224 px; 1.4 GB at the 64 px of the tiny test
model). Each must cost no more than a normal photo. Peaks are the kernel's own high-water mark of resident
memory (``VmHWM``): of each CLI run as a whole, and of the running server per request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipworks
from clipworks.library import Library
from conftest import free_port
from memory_helpers import ADDRESS_SPACE_LIMIT, Run, peak_rss_mb, png, reset_peak_rss, rss_mb, run_measured

CLI = [sys.executable, "-m", "clipworks.cli.main"]
# What one file may add to a run's peak over a normal photo's: allocator and thread noise, not a resize.
MARGIN_MB = 25


def elongated(folder: Path) -> list[Path]:
    """A 40000x1 PNG (a colour ramp) and a 1x40000 palette GIF."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.stack([np.arange(40000) % 256, np.arange(40000) // 160 % 256, np.full(40000, 90)], axis=1)
    Image.fromarray(ramp.astype(np.uint8)[None]).save(folder / "wide.png")
    Image.new("RGB", (1, 40000), (200, 30, 90)).save(folder / "tall.gif")
    return [folder / "wide.png", folder / "tall.gif"]


def copies(photos: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in photos]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """This checkout's sources first; caches (thumbnails) in a temporary home."""
    src = str(Path(clipworks.__file__).parents[1])
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "CLIPWORKS_HOME": str(home)}  # fmt: skip


def cli(env: dict[str, str], *args: str | os.PathLike[str]) -> Run:
    run = run_measured("clipworks.cli.main", *args, env=env)
    assert run.code == 0, run.output
    return run


def test_embed_images_elongated_costs_no_more_than_a_photo(vit_bundle, photos, env, tmp_path) -> None:
    normal = cli(env, "embed", "images", copies(photos[:1], tmp_path / "photo")[0].parent,
                 "-o", tmp_path / "photo.npy", "-m", vit_bundle)  # fmt: skip
    strips = elongated(tmp_path / "strips")
    run = cli(env, "embed", "images", tmp_path / "strips", "-o", tmp_path / "strips.npy", "-m", vit_bundle)
    print(f"embed images: one {Image.open(photos[0]).size} photo {normal.peak_mb:.0f} MB, "
          f"40000x1 + 1x40000 {run.peak_mb:.0f} MB")  # fmt: skip
    assert "skipped" not in run.output  # both are embedded, not refused
    assert json.loads((tmp_path / "strips.paths.json").read_text())["paths"] == [str(p) for p in sorted(strips)]
    assert np.load(tmp_path / "strips.npy").shape == (2, np.load(tmp_path / "photo.npy").shape[1])
    assert run.peak_mb <= normal.peak_mb + MARGIN_MB


@pytest.fixture(scope="module")
def indexed(vit_bundle, photos, env, tmp_path_factory) -> dict:
    """``index add`` of the photos alone, then of the photos beside the strips and a 100-megapixel PNG."""
    tmp = tmp_path_factory.mktemp("index")
    baseline = cli(
        env, "index", "add", copies(photos, tmp / "plain")[0].parent, "--db", tmp / "plain.db", "--model", vit_bundle
    )
    root = tmp / "mixed"
    files = {"photos": copies(photos, root), "strips": elongated(root), "huge": png(root / "huge.png", 10000, 10000)}
    run = cli(env, "index", "add", root, "--db", tmp / "mixed.db", "--model", vit_bundle)
    return {"baseline": baseline, "run": run, "db": tmp / "mixed.db", **files}


def test_index_add_indexes_the_neighbours_of_elongated_files(indexed) -> None:
    baseline, run = indexed["baseline"], indexed["run"]
    print(f"index add: {len(indexed['photos'])} photos {baseline.peak_mb:.0f} MB, "
          f"with the strips and a 100 MP PNG {run.peak_mb:.0f} MB")  # fmt: skip
    with Library(indexed["db"]) as library:
        status = library.status()
        _, vectors, waiting = status.models[0]
        root = str((indexed["db"].parent / "mixed").resolve())
        stored = {Path(row.path).name for row in library.store.files_under(root)}
    assert stored == {p.name for p in [*indexed["photos"], *indexed["strips"], indexed["huge"]]}
    assert vectors == len(indexed["photos"]) + len(indexed["strips"]) and waiting == 0
    # The 100 MP file is refused in one line (Pillow's pixel limit, checked before decoding), not decoded.
    [(path, error)] = status.errors
    assert Path(path).name == "huge.png" and "10000x10000" in error and "over the limit" in error
    assert run.peak_mb <= baseline.peak_mb + MARGIN_MB


def request(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(indexed, env) -> Iterator[tuple[str, int]]:
    """``clipworks serve --db`` on the mixed library, as its own process on loopback: (base URL, pid)."""
    port = free_port()
    child = subprocess.Popen([*CLI, "serve", "--db", str(indexed["db"]), "--port", str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(f"{url}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else "server exited"
            assert time.monotonic() < deadline, "the server did not start in 60 s"
            time.sleep(0.2)
        yield url, child.pid
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def peak_of(pid: int, call) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """How far one call raises the server's peak RSS above its RSS just before, and what the call returned."""
    reset_peak_rss(pid)
    before = rss_mb(pid)
    out = call()
    return peak_rss_mb(pid) - before, out


def embed(url: str, path: Path) -> tuple[int, bytes]:
    return request(f"{url}/v1/embeddings", {"images": [base64.b64encode(path.read_bytes()).decode()]})


def test_http_embeddings_of_elongated_images_cost_no_more_than_a_photo(server, indexed) -> None:
    url, pid = server
    photo = indexed["photos"][0]
    assert embed(url, photo)[0] == 200  # loads the model; what follows measures one request each
    growth, (status, _) = peak_of(pid, lambda: embed(url, photo))
    assert status == 200
    for strip in indexed["strips"]:
        more, (status, body) = peak_of(pid, lambda strip=strip: embed(url, strip))
        print(f"/v1/embeddings: {photo.name} +{growth:.1f} MB, {strip.name} +{more:.1f} MB")
        assert status == 200, body
        assert len(json.loads(body)["data"]) == 1
        assert more <= growth + MARGIN_MB


def test_thumbnails_are_bounded_and_refuse_what_indexing_refused(server, indexed) -> None:
    url, pid = server
    with Library(indexed["db"]) as library:
        ids = {p.name: library.store.file_by_path(str(p.resolve())).id for p in
               [indexed["photos"][0], *indexed["strips"], indexed["huge"]]}  # fmt: skip
    photo = indexed["photos"][0].name
    assert request(f"{url}/thumb/{ids[photo]}")[0] == 200  # warm: the JPEG encoder, the thumbnail folder
    for name, expected in (("wide.png", (256, 1)), ("tall.gif", (1, 256))):
        growth, (status, body) = peak_of(pid, lambda name=name: request(f"{url}/thumb/{ids[name]}"))
        assert status == 200 and Image.open(io.BytesIO(body)).size == expected
        assert growth <= MARGIN_MB
    # 100 megapixels (400 MB as RGB) that indexing refused: the gallery serves no file indexing refused, so it
    # answers from the record without opening the file.
    growth, (status, body) = peak_of(pid, lambda: request(f"{url}/thumb/{ids['huge.png']}"))
    print(f"/thumb of the 100 MP PNG: +{growth:.1f} MB, {status} {body[:120]!r}")
    assert status == 404
    assert "could not be read as an image when indexed" in json.loads(body)["detail"]
    assert growth <= MARGIN_MB


def test_library_decode_of_elongated_images_costs_no_more_than_a_photo(photos, env, tmp_path) -> None:
    """``clipworks.imaging.decode`` at CLIP's real sizes, every resize mode, in a child with its own peak."""
    strips = elongated(tmp_path)
    script = tmp_path / "decode.py"
    script.write_text(
        "import sys\n"
        "from clipworks.imaging import PreprocessConfig, decode\n"
        "for mode in ('shortest', 'longest', 'squash'):\n"
        "    for size in ((224, 224), (336, 336), (224, 320)):\n"
        "        for path in sys.argv[1:]:\n"
        "            assert decode(path, PreprocessConfig(size=size, resize_mode=mode)).shape == (3, *size)\n"
    )
    normal = run_measured(script, photos[0], env=env)
    run = run_measured(script, *strips, env=env)
    print(f"decode, 9 configurations: {photos[0].name} {normal.peak_mb:.0f} MB, strips {run.peak_mb:.0f} MB")
    assert normal.code == 0, normal.output
    # Under the address-space cap of these children (ADDRESS_SPACE_LIMIT) open_clip's order ends in MemoryError.
    assert run.code == 0, f"{run.output[-2000:]} (address space capped at {ADDRESS_SPACE_LIMIT >> 20} MB)"
    assert run.peak_mb <= normal.peak_mb + MARGIN_MB
