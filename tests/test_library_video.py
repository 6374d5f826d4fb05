"""Videos in the photo library: sampled into moments (a frame every N seconds and one at each shot change),
searched beside photos through the Library API, the CLI and the gallery API, played from the moment found
(HTTP Range on the original), and kept honest as files change: unchanged videos are not sampled again, a
changed one has its moments replaced, a removed one leaves search, a corrupt one is named and skipped."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import av
import numpy as np
import pytest

from clipworks.library import Library

FPS = 10
SIDE = 64
RED, BLUE, GREEN = (200, 40, 40), (40, 60, 200), (40, 180, 60)
CUT_AT = 3.3  # the hard cut of cut.mp4, between a red and a blue scene
EVERY = 2.0


def scene_frame(colour: tuple[int, int, int], n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame of a scene: a flat colour with a bar moving across it (motion inside the shot) and noise."""
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = colour
    x = (n * 3) % SIDE
    image[:, x : x + 6] = 255 - np.asarray(colour, np.uint8)
    if rng is not None:
        image = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    return image


def make_video(path: Path, scenes: list[tuple[tuple[int, int, int], float]], codec: str = "mpeg4") -> Path:
    """A real encoded video of ``scenes`` (colour, seconds) at `FPS`, written with PyAV."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        n = 0
        for colour, seconds in scenes:
            for _ in range(round(seconds * FPS)):
                frame = av.VideoFrame.from_ndarray(scene_frame(colour, n, rng), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                n += 1
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos) -> Path:
    """Photos and videos side by side: a video with a cut, a one-shot video in a subfolder (another
    container), and a truncated one that cannot be read."""
    root = tmp_path_factory.mktemp("media") / "media"
    (root / "trip").mkdir(parents=True)
    for p in photos[:3]:
        shutil.copy(p, root / p.name)
    make_video(root / "cut.mp4", [(RED, CUT_AT), (BLUE, 6.0 - CUT_AT)])
    make_video(root / "trip" / "still.mkv", [(GREEN, 3.0)])
    whole = (root / "cut.mp4").read_bytes()
    (root / "broken.mp4").write_bytes(whole[: len(whole) // 2])  # PyAV writes the index last: it is cut off
    return root


@pytest.fixture(scope="module")
def library(media, model, tmp_path_factory):
    lib = Library(tmp_path_factory.mktemp("db") / "lib.db", model, create=True)
    lib.report = lib.index([media], video_every=EVERY, batch_size=8)
    yield lib
    lib.close()


def moments_of(db: Path) -> dict[str, list[float]]:
    """Video name -> its moments' times, read straight from SQLite."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT f.path, m.time FROM moments m JOIN files f ON f.id = m.file_id "
            "WHERE f.deleted_at IS NULL ORDER BY f.path, m.ordinal"
        ).fetchall()
    out: dict[str, list[float]] = {}
    for path, t in rows:
        out.setdefault(Path(path).name, []).append(round(t, 3))
    return out


def test_index_samples_videos_into_moments(library, media) -> None:
    report = library.report
    assert (report.new, report.embedded, report.failed) == (6, 5, 1)
    assert report.moments == 4 + 2
    # Every 2 s from the start, plus the first frame of the blue shot.
    assert moments_of(library.path) == {"cut.mp4": [0.0, 2.0, CUT_AT, 4.0], "still.mkv": [0.0, 2.0]}
    [(path, error)] = report.failures
    assert path == str(media / "broken.mp4") and "broken.mp4" in error
