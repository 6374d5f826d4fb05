"""Videos in the photo library: sampled into moments (a frame every N seconds and one at each shot change),
searched beside photos through the Library API, the CLI and the gallery API, played from the moment found
(HTTP Range on the original), and kept honest as files change: unchanged videos are not sampled again, a
changed one has its moments replaced, a removed one leaves search, a corrupt one is named and skipped."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipworks.cli.main import main
from clipworks.library import Library, make_filters
from clipworks.service import ServiceSettings, create_app, gallery
from library_helpers import SIDE, make_video, scene_frame

RED, BLUE, GREEN = (200, 40, 40), (40, 60, 200), (40, 180, 60)
CUT_AT = 3.3  # the hard cut of cut.mp4, between a red and a blue scene
EVERY = 2.0


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
    described = library.metadata([file_of(library, "cut.mp4"), file_of(library, "trip/still.mkv")])
    cut, still = described.values()
    assert (cut.kind, cut.width, cut.height) == ("video", SIDE, SIDE) and cut.duration == pytest.approx(6.0, abs=0.15)
    assert still.kind == "video" and still.duration == pytest.approx(3.0, abs=0.15)
    photo = library.metadata([file_of(library, "baboon.jpg")])
    assert [m.kind for m in photo.values()] == ["photo"] and next(iter(photo.values())).duration is None


def file_of(library: Library, relative: str) -> int:
    root = Path(library.store.roots()[0][0])
    row = library.store.file_by_path(str(root / relative))
    assert row is not None, relative
    return row.id


@pytest.fixture(scope="module")
def blue_photo(tmp_path_factory) -> Path:
    """A still of cut.mp4's second shot: searching by it must find that shot."""
    path = tmp_path_factory.mktemp("query") / "blue.png"
    Image.fromarray(scene_frame(BLUE, 40)).save(path)
    return path


def test_search_returns_moments_beside_photos(library, media, blue_photo) -> None:
    hits = library.search(images=[blue_photo], top_k=20)
    assert len(hits) == 3 + 4 + 2  # every photo and every moment, the broken video in none
    best = hits[0]
    assert (Path(best.path).name, best.time) in {("cut.mp4", CUT_AT), ("cut.mp4", 4.0)}
    assert {h.time for h in hits if Path(h.path).suffix == ".jpg"} == {None}
    assert sorted(h.time for h in hits if h.path.endswith("cut.mp4")) == [0.0, 2.0, CUT_AT, 4.0]

    videos = library.search(images=[blue_photo], top_k=20, filters=make_filters(kind="video"))
    assert [h for h in hits if h.time is not None] == videos
    photos = library.search(images=[blue_photo], top_k=20, filters=make_filters(kind="photo"))
    assert [h for h in hits if h.time is None] == photos
    trip = library.search(images=[blue_photo], top_k=20, filters=make_filters(folder=str(media / "trip")))
    assert [(Path(h.path).name, h.time) for h in sorted(trip, key=lambda h: h.time)] == [
        ("still.mkv", 0.0), ("still.mkv", 2.0)
    ]  # fmt: skip
    by_date = library.search(images=[blue_photo], top_k=20, sort="date")
    assert sorted(by_date) == sorted(hits)


def places(hits: list) -> list[tuple[str, float | None]]:
    return [(Path(h.path).name, h.time) for h in hits]


def test_approximate_search_returns_the_same_moments(library, blue_photo) -> None:
    """The HNSW graph holds moments as nodes like photos; its exact re-ranking returns the same hits."""
    exact = library.search(images=[blue_photo], top_k=6)
    videos = [h for h in library.search(images=[blue_photo], top_k=20) if h.time is not None]
    with Library(library.path, library.clip, ann="on", side_file=False) as ann:
        assert type(ann.searcher()).__name__ == "AnnIndex"
        approximate = ann.search(images=[blue_photo], top_k=6)
        assert places(approximate) == places(exact)
        assert [h.score for h in approximate] == pytest.approx([h.score for h in exact], abs=1e-5)
        filtered = ann.search(images=[blue_photo], top_k=6, filters=make_filters(kind="video"))
        assert places(filtered) == places(videos[:6])


def test_cli_search_status_duplicates_with_videos(library, blue_photo, capsys) -> None:
    db = ["--db", str(library.path)]
    assert main(["search", "--image", str(blue_photo), *db, "--top-k", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("cut.mp4 @ 00:00:03.3") for line in lines), lines
    assert sum(" @ " in line for line in lines) == 6
    assert main(["search", "--image", str(blue_photo), *db, "--top-k", "20", "--type", "video", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 6 and all(h["time"] is not None for h in found)
    assert {round(h["time"], 3) for h in found if h["path"].endswith("cut.mp4")} == {0.0, 2.0, CUT_AT, 4.0}
    assert main(["search", "--image", str(blue_photo), *db, "--type", "photo", "--json"]) == 0
    assert {h["time"] for h in json.loads(capsys.readouterr().out)} == {None}

    assert main(["index", "status", *db, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["videos"], status["moments"], status["models"][0]["vectors"]) == (2, 6, 9)
    assert [Path(e["path"]).name for e in status["errors"]] == ["broken.mp4"]
    assert main(["duplicates", *db, "--threshold", "-1", "--json"]) == 0  # every row alike: one group
    [group] = json.loads(capsys.readouterr().out)
    assert len(group) == 3 and all(h["path"].endswith(".jpg") for h in group)  # moments are no duplicates
    assert main(["similar", str(Path(library.store.roots()[0][0]) / "cut.mp4"), *db]) != 0
    assert "is a video" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pkl", ".parquet"])
def test_export_and_import_keep_moments(library, blue_photo, tmp_path, suffix) -> None:
    """Moments leave as ``video#t=SECONDS`` (Parquet also has ``time``) and come back as moments."""
    out = tmp_path / f"vectors{suffix}"
    assert library.export(out).count == 3 + 6
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        rows = {(Path(p).name, t) for p, t in zip(table["path"], table["time"], strict=True)}
        assert ("cut.mp4#t=3.300", CUT_AT) in rows and ("baboon.jpg", None) in rows
    with Library(tmp_path / "copy.db", library.clip, create=True) as copy:
        assert copy.import_file(out).imported == 3 + 6
        want = library.search(images=[blue_photo], top_k=20)
        got = copy.search(images=[blue_photo], top_k=20)
        assert places(got) == places(want) and [h.score for h in got] == pytest.approx([h.score for h in want])
        assert places(copy.search(images=[blue_photo], top_k=20, filters=make_filters(kind="video"))) == [
            p for p in places(want) if p[1] is not None
        ]


@pytest.fixture(scope="module")
def client(model, library, tmp_path_factory):
    settings = ServiceSettings(tags=["dog"], tags_cache_dir=tmp_path_factory.mktemp("tags"))
    with TestClient(create_app(settings, model=model, library=library, routers=[gallery.router])) as c:
        yield c


def test_gallery_api_returns_playable_moments(client, library, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "cache"))
    cut = file_of(library, "cut.mp4")
    r = client.get("/api/search", params={"q": "a blue frame", "k": 20, "type": "video"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 6 and {h["type"] for h in results} == {"video"}
    moment = next(h for h in results if h["id"] == cut and h["time"] == CUT_AT)
    assert moment["play"] == f"/original/{cut}#t=3.300" and moment["thumb"] == f"/thumb/{cut}?t=3.300"
    assert moment["duration"] == pytest.approx(6.0, abs=0.15)
    photos = client.get("/api/search", params={"q": "a blue frame", "k": 20, "type": "photo"}).json()["results"]
    assert len(photos) == 3 and {(h["time"], h["play"]) for h in photos} == {(None, None)}
    assert client.get("/api/library").json()["moments"] == 6

    thumb = client.get(moment["thumb"])  # the frame of the moment found: the blue shot
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    pixels = np.asarray(Image.open(io.BytesIO(thumb.content)).convert("RGB"), np.float32).reshape(-1, 3).mean(0)
    assert pixels[2] > 120 and pixels[0] < 100, pixels
    first = np.asarray(Image.open(io.BytesIO(client.get(f"/thumb/{cut}").content)).convert("RGB"), np.float32)
    assert first.reshape(-1, 3).mean(0)[0] > 120  # no time: the first frame, red


def test_gallery_serves_videos_with_byte_ranges(client, library, media) -> None:
    cut = file_of(library, "cut.mp4")
    data = (media / "cut.mp4").read_bytes()
    whole = client.get(f"/original/{cut}")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(f"/original/{cut}", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}" and part.headers["content-length"] == "1000"
    tail = client.get(f"/original/{cut}", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == data[-50:]
    rest = client.get(f"/original/{cut}", headers={"Range": f"bytes={len(data) - 10}-"})
    assert rest.status_code == 206 and rest.content == data[-10:]
    outside = client.get(f"/original/{cut}", headers={"Range": f"bytes={len(data)}-"})
    assert outside.status_code == 416 and outside.headers["content-range"] == f"bytes */{len(data)}"
    still = client.get(f"/original/{file_of(library, 'trip/still.mkv')}", headers={"Range": "bytes=0-9"})
    assert still.status_code == 206 and still.headers["content-type"] == "video/x-matroska"  # mpeg4: not WebM
    photo = client.get(f"/original/{file_of(library, 'baboon.jpg')}", headers={"Range": "bytes=0-1"})
    assert photo.status_code == 206 and photo.content == b"\xff\xd8"

    # Only indexed files, named by id: no path, no traversal, nothing unreadable.
    broken = file_of(library, "broken.mp4")
    for url in (f"/original/{broken}", "/original/999999", "/original/..%2F..%2Fetc%2Fpasswd", "/original/-1"):
        assert client.get(url).status_code in (404, 422), url


def test_video_files_change_honestly(model, tmp_path, capsys) -> None:
    """Unchanged: no work. Copied or moved: moments follow without sampling. Changed: replaced. Another
    --video-every: sampled again. Removed: out of search. Corrupt: named on one line, the rest indexed."""
    root = tmp_path / "videos"
    root.mkdir()
    video = make_video(root / "a.mp4", [(RED, CUT_AT), (BLUE, 6.0 - CUT_AT)])
    db = tmp_path / "lib.db"
    with Library(db, model, create=True) as lib:
        assert lib.index([root]).moments == 4  # the default: every 2 s, and the cut
        again = lib.index([root])
        assert (again.unchanged, again.embedded, again.moments) == (1, 0, 0)

        shutil.copy(video, root / "copy.mp4")
        copied = lib.index([root])
        assert (copied.copied, copied.embedded) == (1, 0)
        assert moments_of(db)["copy.mp4"] == moments_of(db)["a.mp4"] == [0.0, 2.0, CUT_AT, 4.0]
        (root / "copy.mp4").rename(root / "moved.mp4")
        moved = lib.index([root])
        assert (moved.moved, moved.embedded) == (1, 0) and "moved.mp4" in moments_of(db)

        make_video(video, [(GREEN, 1.0), (RED, 1.5)])  # edited: a new cut, shorter
        changed = lib.index([root])
        assert (changed.changed, changed.embedded, changed.moments) == (1, 1, 3)
        assert moments_of(db)["a.mp4"] == [0.0, 1.0, 2.0]
        edited = lib.store.file_by_path(str(video)).id
        assert lib.metadata([edited])[edited].duration == pytest.approx(2.5, abs=0.15)

        resampled = lib.index([root], video_every=1.0)
        assert (resampled.embedded, resampled.moments) == (2, 3 + 7)  # a.mp4: 0, 1 (also its cut), 2; moved: 0-5 + cut
        assert moments_of(db)["moved.mp4"] == [0.0, 1.0, 2.0, 3.0, CUT_AT, 4.0, 5.0]
        assert lib.index([root], video_every=1.0).embedded == 0

        (root / "moved.mp4").unlink()
        removed = lib.index([root])
        assert removed.deleted == 1 and set(moments_of(db)) == {"a.mp4"}
        assert {Path(h.path).name for h in lib.search("x", top_k=50)} == {"a.mp4"}

    (root / "bad.mov").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # a header, then garbage
    Image.new("RGB", (40, 30), RED).save(root / "red.png")
    assert main(["index", "add", str(root), "--db", str(db), "--model", str(model.bundle.root)]) == 0
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert str(root / "bad.mov") in warning and "1 failed" in err and "1 embedded" in err
    with Library(db) as lib:
        assert {Path(h.path).name for h in lib.search("x", top_k=50)} == {"a.mp4", "red.png"}
        assert moments_of(db)["a.mp4"] == [0.0, 1.0, 2.0]  # nothing stored was lost
    assert main(["index", "add", str(root), "--db", str(db), "--video-every", "0"]) != 0
    assert "--video-every must be at least" in capsys.readouterr().err


def test_moments_of_a_real_clip_follow_the_interval_and_ignore_an_exposure_jump(test_data) -> None:
    """ActivityNet's dog-walk clip has no cut; its camera's exposure jumps at 10.27 s (histogram distance
    0.27): below `CUT_THRESHOLD`, so only the regular moments are taken."""
    from clipworks.video.frames import Moments, Sampling, iter_frames

    clip = test_data / "videos" / "v_ZNVhz7ctTq0.mp4"
    times = [f.timestamp_ms / 1000 for f in iter_frames(clip, Sampling(None, 0.0, moments=Moments(2.0)))]
    assert times == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    lower = [f.timestamp_ms / 1000 for f in iter_frames(clip, Sampling(None, 0.0, moments=Moments(5.0, 0.2)))]
    assert lower == [0.0, 5.0, 10.0, pytest.approx(10.267, abs=1e-3)]  # a lower threshold takes the jump
