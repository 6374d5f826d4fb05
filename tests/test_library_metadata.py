"""Photo metadata read at index time (EXIF dates with offsets, GPS, camera, size) and the search filters
built on it, through the Library API, the CLI and the gallery's JSON API on a real server: filters pick
the photos before ranking, pages partition the ranking, and hostile EXIF never stops a photo from
being indexed. The photos are real ones with real EXIF written by Pillow."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from clipworks.cli.main import main
from clipworks.errors import UsageError
from clipworks.library import Library, make_filters
from clipworks.library.metadata import bounding_box, haversine_km, parse_near
from clipworks.library.store import MIGRATIONS, SCHEMA_VERSION
from clipworks.models.fingerprint import model_fingerprint
from clipworks.service import ServiceSettings, create_app, gallery
from conftest import serve_app
from library_helpers import Shot, dms, exif_of, file_ids, stored_vectors, write_shots

SHOTS = [
    Shot("tokyo.jpg", "2023:07:14 18:30:05", "+09:00", (35.6586, 139.7454), "Canon", "EOS R5", "RF24-70mm F2.8 L"),
    # 01:00 on 1 June in Paris is 23:00 on 31 May in UTC: date filters go by the local date.
    Shot("paris.jpg", "2024:06:01 01:00:00", "+02:00", (48.8584, 2.2945), "Apple", "iPhone 15 Pro"),
    Shot("newyork.jpg", "2022:12:31 20:00:00", "-05:00", (40.6892, -74.0445), "NIKON CORPORATION", "NIKON Z 6"),
    Shot("trip/fiji.jpg", "2019:05:05 12:00:00", "+12:00", (-17.7134, 178.0650), "Canon", "EOS 5D"),
    # Across the antimeridian from Fiji, about 230 km away.
    Shot("trip/taveuni.jpg", "2019:05:06 12:00:00", "+12:00", (-16.8, -179.95), "Canon", "EOS 5D"),
    Shot("naive.jpg", "2021:03:04 05:06:07", None, None, "FUJIFILM", "X-T4"),  # no offset: zone unknown
    Shot("plain.jpg", None, None, None, None, None),  # no EXIF at all: the file time counts
]
PLAIN_MTIME = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
ALL = {s.name.split("/")[-1] for s in SHOTS}


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def library(model, photos, tmp_path_factory) -> Library:
    root = write_shots(photos, tmp_path_factory.mktemp("meta") / "photos", SHOTS, PLAIN_MTIME)
    lib = Library(root.parent / "lib.db", model, create=True)
    lib.index([root], batch_size=4)
    yield lib
    lib.close()


def names(hits) -> list[str]:
    return [os.path.basename(h.path if hasattr(h, "path") else h["path"]) for h in hits]


def by_name(library: Library) -> dict[str, Any]:
    ids = file_ids(library.path)
    described = library.metadata(list(ids.values()))
    return {os.path.basename(p): described[i] for p, i in ids.items()}


# -- extraction --------------------------------------------------------------------------------------


def test_index_reads_exif_dates_offsets_gps_camera_and_size(library) -> None:
    meta = by_name(library)
    tokyo = meta["tokyo.jpg"]
    assert tokyo.taken_source == "exif"
    assert tokyo.taken_at == datetime(2023, 7, 14, 9, 30, 5, tzinfo=UTC).timestamp()  # 18:30 at +09:00
    assert tokyo.taken_offset == 9 * 3600 and tokyo.taken_iso() == "2023-07-14T18:30:05+09:00"
    assert tokyo.lat == pytest.approx(35.6586, abs=1e-4) and tokyo.lon == pytest.approx(139.7454, abs=1e-4)
    assert (tokyo.make, tokyo.model, tokyo.lens, tokyo.orientation) == ("Canon", "EOS R5", "RF24-70mm F2.8 L", 1)
    with Image.open(Path(library.path).parent / "photos" / "tokyo.jpg") as im:
        assert (tokyo.width, tokyo.height) == im.size
    assert (tokyo.kind, tokyo.duration) == ("photo", None)
    assert meta["newyork.jpg"].lon == pytest.approx(-74.0445, abs=1e-4)  # W is negative
    assert meta["fiji.jpg"].lat == pytest.approx(-17.7134, abs=1e-4)  # S is negative
    assert meta["newyork.jpg"].taken_iso() == "2022-12-31T20:00:00-05:00"
    naive = meta["naive.jpg"]
    assert (naive.taken_source, naive.taken_offset, naive.taken_iso()) == ("exif", None, "2021-03-04T05:06:07")
    plain = meta["plain.jpg"]
    assert plain.taken_source == "file" and plain.taken_at == pytest.approx(PLAIN_MTIME)
    assert (plain.lat, plain.make, plain.camera) == (None, None, None)


Entry = tuple[int, int, bytes]  # (TIFF type, count, the value's bytes)


def raw_exif(
    ifd0: dict[int, Entry], exif: dict[int, Entry] | None = None, gps: dict[int, Entry] | None = None
) -> bytes:
    """An EXIF segment written by hand (little-endian TIFF), for tags of types no writer would emit."""
    import struct

    tables = [ifd0] + [t for t in (exif, gps) if t is not None]
    pointers = [tag for tag, t in ((0x8769, exif), (0x8825, gps)) if t is not None]
    sizes = [2 + 12 * (len(t) + (len(pointers) if i == 0 else 0)) + 4 for i, t in enumerate(tables)]
    starts = [8 + sum(sizes[:i]) for i in range(len(tables))]
    data_at = 8 + sum(sizes)
    blobs, out = b"", b""
    for i, table in enumerate(tables):
        entries = dict(table)
        if i == 0:
            for tag, start in zip(pointers, starts[1:], strict=True):
                entries[tag] = (4, 1, struct.pack("<I", start))
        out += struct.pack("<H", len(entries))
        for tag in sorted(entries):
            kind, count, value = entries[tag]
            if len(value) <= 4:
                out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
            else:
                out += struct.pack("<HHII", tag, kind, count, data_at + len(blobs))
                blobs += value + b"\0" * (len(value) % 2)
        out += b"\0\0\0\0"
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + out + blobs


class Hostile(NamedTuple):
    name: str
    exif: Any  # an Exif object, or raw bytes for the APP1 segment
    expect: dict[str, Any]  # Metadata fields as they must fall back


def _hostile() -> list[Hostile]:
    def base(**sub: Any) -> Image.Exif:
        exif = Image.Exif()
        exif[0x010F] = "Canon"
        ifd = exif.get_ifd(ExifTags.IFD.Exif)
        ifd[0x9003] = "2024:02:03 04:05:06"
        for tag, value in sub.items():
            ifd[int(tag[1:], 16)] = value
        return exif

    def gps(lat: Any, ref: Any = "N") -> Image.Exif:
        exif = base()
        ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        ifd[1], ifd[2], ifd[3], ifd[4] = ref, lat, "E", dms(10.0)
        return exif

    zero = IFDRational(5, 0)
    good_date = {"taken_source": "exif", "make": "Canon"}
    no_place = {**good_date, "lat": None, "lon": None}
    file_time = {"taken_source": "file", "taken_offset": os.path.getmtime}  # callable: checked loosely
    big_make = base()
    big_make[0x010F] = "X" * 60_000
    control_make = base()
    control_make[0x010F] = "Ca\x1bn\x07on\n"
    bad_orientation = base()
    bad_orientation[0x0112] = 99
    return [
        Hostile("zero-denominator-gps.jpg", gps((zero, zero, zero)), no_place),
        Hostile("huge-latitude.jpg", gps((IFDRational(10**9, 1), IFDRational(0, 1), IFDRational(0, 1))), no_place),
        Hostile(
            "gps-as-text.jpg",
            raw_exif(
                {0x010F: (2, 6, b"Canon\0")},
                gps={1: (2, 2, b"N\0"), 2: (2, 6, b"north\0"), 3: (2, 2, b"E\0"), 4: (2, 6, b"east!\0")},
            ),
            {"make": "Canon", "lat": None, "lon": None},
        ),
        Hostile(
            "date-as-number.jpg",
            raw_exif({0x010F: (2, 6, b"Canon\0")}, exif={0x9003: (4, 1, b"\x39\x30\0\0")}),
            {"taken_source": "file", "make": "Canon"},
        ),
        Hostile(
            "make-as-rational.jpg",
            raw_exif({0x010F: (5, 1, b"\1\0\0\0\0\0\0\0"), 0x0112: (2, 4, b"six\0")}),
            {"make": None, "orientation": None},
        ),
        Hostile("huge-counts.jpg", raw_exif({0x010F: (2, 0x7FFFFFFF, b"\0\0\0\0")}), {"make": None}),
        Hostile("gps-bad-ref.jpg", gps(dms(10.0), ref="Q"), no_place),
        Hostile("date-zeros.jpg", base(x9003="0000:00:00 00:00:00"), file_time),
        Hostile("date-month-13.jpg", base(x9003="2024:13:01 00:00:00"), file_time),
        Hostile("date-words.jpg", base(x9003="yesterday"), file_time),
        Hostile("offset-out-of-range.jpg", base(x9011="+99:00"), {**good_date, "taken_offset": None}),
        Hostile("huge-make.jpg", big_make, {"make": "X" * 120}),
        Hostile("control-chars-make.jpg", control_make, {"make": "Canon"}),
        Hostile("orientation-99.jpg", bad_orientation, {"orientation": None, **good_date}),
        Hostile("truncated-exif.jpg", b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01", {"taken_source": "file"}),
        Hostile("garbage-exif.jpg", b"Exif\x00\x00" + bytes(range(256)) * 4, {"taken_source": "file"}),
    ]


HOSTILE = _hostile()


@pytest.fixture(scope="module")
def hostile_library(model, photos, tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("hostile") / "photos"
    root.mkdir()
    for i, case in enumerate(HOSTILE):
        image = Image.open(photos[i % len(photos)]).convert("RGB").rotate(i * 7)
        image.save(root / case.name, exif=case.exif)
    lib = Library(root.parent / "lib.db", model, create=True)
    report = lib.index([root])
    assert (report.embedded, report.failed) == (len(HOSTILE), 0)
    yield lib
    lib.close()


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_exif_falls_back_and_the_photo_is_still_indexed(hostile_library, case) -> None:
    assert any(p.endswith(case.name) for p in stored_vectors(hostile_library.path))
    meta = by_name(hostile_library)[case.name]
    assert meta.width and meta.height and meta.kind == "photo"
    for field, want in case.expect.items():
        if callable(want):  # a file time: the machine's own offset, an instant near the file's mtime
            assert isinstance(meta.taken_offset, int) and meta.taken_at is not None
        else:
            assert getattr(meta, field) == want, field


# -- filters through the Library API ---------------------------------------------------------------

# One row per filter class: the filter, and the photos it lets through.
FILTER_TABLE = [
    ({"after": "2024-06-01"}, {"paris.jpg"}),  # its UTC time is 31 May: the local date decides
    ({"before": "2019-05-05"}, {"fiji.jpg"}),  # the whole day counts
    ({"after": "2019-05-05", "before": "2019-05-06"}, {"fiji.jpg", "taveuni.jpg"}),
    ({"after": "2024-05-31T22:00:00Z"}, {"paris.jpg"}),  # an instant: compared in UTC
    ({"before": "2024-05-31T22:00:00+00:00"}, ALL - {"paris.jpg"}),
    ({"after": "2021-03-04T05:00", "before": "2021-03-04T05:10"}, {"naive.jpg"}),  # wall clock, no zone
    ({"before": "2020-01-02"}, {"fiji.jpg", "taveuni.jpg", "plain.jpg"}),  # the file time of a photo without EXIF
    ({"camera": "canon"}, {"tokyo.jpg", "fiji.jpg", "taveuni.jpg"}),
    ({"camera": "Z 6"}, {"newyork.jpg"}),
    ({"camera": "eos 5d"}, {"fiji.jpg", "taveuni.jpg"}),
    ({"near": "48.8566,2.3522,10"}, {"paris.jpg"}),  # the Eiffel tower is 4 km from the centre
    ({"near": "48.8566,2.3522,3"}, set()),
    ({"near": "-17.7134,178.0650,300"}, {"fiji.jpg", "taveuni.jpg"}),  # across the antimeridian
    ({"near": "-17.7134,178.0650,50"}, {"fiji.jpg"}),
    ({"near": "40.7128,-74.0060,20"}, {"newyork.jpg"}),
    ({"type": "photo"}, ALL),
    ({"type": "video"}, set()),
    ({"camera": "canon", "after": "2020-01-01"}, {"tokyo.jpg"}),  # filters combine
]


def filters_of(spec: dict[str, str], root: Path) -> Any:
    spec = dict(spec)
    if "folder" in spec:
        spec["folder"] = str(root / spec["folder"])
    kind = spec.pop("type", None)
    return make_filters(kind=kind, **spec)


@pytest.mark.parametrize(("spec", "want"), FILTER_TABLE, ids=[json.dumps(s) for s, _ in FILTER_TABLE])
def test_each_filter_through_the_library_api(library, spec, want) -> None:
    root = Path(library.path).parent / "photos"
    hits = library.search("a photo", top_k=50, filters=filters_of(spec, root))
    assert set(names(hits)) == want
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    similar = library.similar(root / "tokyo.jpg", top_k=50, filters=filters_of(spec, root))
    assert set(names(similar)) == want - {"tokyo.jpg"}


def test_folder_filter_holds_every_photo_under_it(library) -> None:
    root = Path(library.path).parent / "photos"
    assert set(names(library.search("x", top_k=50, filters=make_filters(folder=str(root / "trip"))))) == {
        "fiji.jpg",
        "taveuni.jpg",
    }
    assert len(library.search("x", top_k=50, filters=make_filters(folder=str(root)))) == len(SHOTS)
    assert library.search("x", top_k=50, filters=make_filters(folder=str(root / "tri"))) == []  # not a prefix match


@pytest.mark.parametrize("ann", ["off", "on"])
def test_a_filter_selects_before_ranking(library, ann) -> None:
    """The photo ranked last of all is still the first (and only) hit when a filter lets only it through;
    with the HNSW index a selective filter scans the allowed rows exactly, a broad one walks the graph
    skipping refused nodes, and both agree with the exact answer."""
    lib = Library(library.path, ann=ann)
    try:
        everything = lib.search("a dog on a beach", top_k=50)
        last = everything[-1]
        day = by_name(lib)[os.path.basename(last.path)].taken_iso()[:10]
        hits = lib.search("a dog on a beach", top_k=1, filters=make_filters(after=day, before=day))
        assert [h.path for h in hits] == [last.path]
        assert hits[0].score == pytest.approx(last.score, abs=1e-5)
        broad = make_filters(after="1990-01-01")  # every photo: the broad path
        want = [h.path for h in everything]
        assert [h.path for h in lib.search("a dog on a beach", top_k=50, filters=broad)] == want
    finally:
        lib.close()


def test_recent_lists_newest_first_pages_filters_and_counts_months(library) -> None:
    """The timeline: no query, newest first by the wall clock where taken, paged, filtered like a search."""
    by_id = {i: Path(p).name for p, i in file_ids(library.path).items()}
    newest = ["paris.jpg", "tokyo.jpg", "newyork.jpg", "naive.jpg", "plain.jpg", "taveuni.jpg", "fiji.jpg"]
    everything = library.recent(top_k=50)
    assert [by_id[i] for i in everything] == newest
    assert library.recent(top_k=3, offset=3) == everything[3:6]
    canon = make_filters(camera="canon")
    assert [by_id[i] for i in library.recent(top_k=50, filters=canon)] == ["tokyo.jpg", "taveuni.jpg", "fiji.jpg"]
    assert library.month_counts(canon) == [("2023-07", 1), ("2019-05", 2)]
    assert sum(n for _, n in library.month_counts()) == len(newest)
    with pytest.raises(UsageError, match="offset"):
        library.recent(offset=-1)


def test_offset_pages_partition_the_ranking_and_date_sort_keeps_each_page(library) -> None:
    everything = library.search("a red fruit", top_k=50)
    pages = [library.search("a red fruit", top_k=3, offset=o) for o in range(0, len(everything), 3)]
    assert [h.path for page in pages for h in page] == [h.path for h in everything]
    by_date = library.search("a red fruit", top_k=3, offset=3, sort="date")
    assert {h.path for h in by_date} == {h.path for h in pages[1]}
    meta = by_name(library)
    times = [meta[os.path.basename(h.path)].local_time for h in library.search("x", top_k=50, sort="date")]
    assert times == sorted(times, reverse=True)


def test_type_video_selects_rows_marked_video(library, tmp_path) -> None:
    """The stored kind is what ``type=video`` selects and ``type=photo`` leaves out (videos indexed as moments
    are in test_library_video.py)."""
    db = tmp_path / "copy.db"
    conn = sqlite3.connect(db)
    with sqlite3.connect(library.path) as source:
        source.backup(conn)
    conn.execute("UPDATE files SET kind = 'video', duration = 12.5 WHERE path LIKE '%tokyo.jpg'")
    conn.commit()
    conn.close()
    lib = Library(db, side_file=False)
    try:
        assert names(lib.search("x", top_k=50, filters=make_filters(kind="video"))) == ["tokyo.jpg"]
        assert set(names(lib.search("x", top_k=50, filters=make_filters(kind="photo")))) == ALL - {"tokyo.jpg"}
    finally:
        lib.close()


# Each class of bad filter value: the arguments and what the one error line must name.
BAD_FLAGS = [
    (["--after", "yesterday"], "--after"),
    (["--before", "2024-13-01"], "--before"),
    (["--after", "2024-06-02", "--before", "2024-06-01"], "later than --before"),
    (["--near", "48.8,2.3"], "--near"),
    (["--near", "91,0,5"], "--near"),
    (["--near", "48,2,-1"], "--near"),
    (["--near", "nan,2,5"], "--near"),
    (["--type", "gif"], "--type"),
    (["--sort", "name"], "--sort"),
    (["--offset", "-1"], "--offset"),
    (["--camera", " "], "--camera"),
]


@pytest.mark.parametrize(("args", "named"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_filter_values_are_one_line_naming_the_flag(library, capsys, args, named) -> None:
    assert main(["search", "x", "--db", str(library.path), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines


def test_parse_near_and_the_bounding_box_hold_the_circle() -> None:
    near = parse_near("-17.7,179.9,100")
    (low, high), lons = bounding_box(near)
    assert lons is not None and len(lons) == 2  # split at the antimeridian
    rng = np.random.default_rng(0)
    for _ in range(2000):  # every point inside the circle lies inside the box
        lat, lon = rng.uniform(-19, -16), rng.uniform(177, 183)
        lon = (lon + 180) % 360 - 180
        if haversine_km(near.lat, near.lon, lat, lon) <= near.km:
            assert low <= lat <= high and any(a <= lon <= b for a, b in lons)
    assert bounding_box(parse_near("89.9,0,50"))[1] is None  # over the pole: every longitude
    with pytest.raises(UsageError, match="near"):
        parse_near("1,2,3,4")


# -- the CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), FILTER_TABLE, ids=[json.dumps(s) for s, _ in FILTER_TABLE])
def test_each_filter_through_the_cli(library, capsys, spec, want) -> None:
    flags = [part for field, value in spec.items() for part in (f"--{field}", value)]
    assert main(["search", "a", "photo", "--db", str(library.path), "--top-k", "50", "--json", *flags]) == 0
    assert set(names(json.loads(capsys.readouterr().out))) == want


def test_cli_folder_offset_and_date_sort(library, capsys) -> None:
    db = ["--db", str(library.path)]
    root = Path(library.path).parent / "photos"
    assert main(["search", "x", *db, "--folder", str(root / "trip"), "--json"]) == 0
    assert set(names(json.loads(capsys.readouterr().out))) == {"fiji.jpg", "taveuni.jpg"}
    assert main(["search", "sunset", *db, "--top-k", "50", "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert main(["search", "sunset", *db, "--top-k", "2", "--offset", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == everything[2:4]
    assert main(["search", "sunset", *db, "--top-k", "50", "--sort", "date", "--json"]) == 0
    dated = names(json.loads(capsys.readouterr().out))
    assert dated == ["paris.jpg", "tokyo.jpg", "newyork.jpg", "naive.jpg", "plain.jpg", "taveuni.jpg", "fiji.jpg"]
    assert main(["similar", str(root / "paris.jpg"), *db, "--camera", "canon", "--json"]) == 0
    assert set(names(json.loads(capsys.readouterr().out))) == {"tokyo.jpg", "fiji.jpg", "taveuni.jpg"}


# -- schema migration, re-reading, export --------------------------------------------------------------


def test_migration_of_a_schema_2_library_keeps_every_row_and_vector(model, photos, tmp_path) -> None:
    root = write_shots(photos, tmp_path / "photos", SHOTS, PLAIN_MTIME).resolve()
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    name, weights = model_fingerprint(model).vectors
    conn.execute(
        "INSERT INTO models (name, fingerprint, dim, source) VALUES (?, ?, ?, ?)",
        (name, weights, model.embed_dim, str(model.bundle.root)),
    )
    conn.execute("INSERT INTO roots (path, excludes, follow_links, added_at) VALUES (?, '[]', 0, 0)", (str(root),))
    rng = np.random.default_rng(7)
    for path in sorted(root.rglob("*.jpg")):
        st = path.stat()
        file_id = conn.execute(
            "INSERT INTO files (path, size, mtime_ns, dev, ino, updated_at) VALUES (?, ?, ?, ?, ?, 0)",
            (str(path), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino),
        ).lastrowid
        vector = rng.standard_normal(model.embed_dim).astype("<f4")
        conn.execute("INSERT INTO embeddings VALUES (1, ?, ?)", (file_id, (vector / np.linalg.norm(vector)).tobytes()))
    conn.commit()
    rows_sql = "SELECT id, path, size, mtime_ns, hash, error, deleted_at, dev, ino, target, updated_at FROM files"
    before_rows = conn.execute(rows_sql).fetchall()
    conn.close()
    before_vectors = stored_vectors(db)

    lib = Library(db, model, create=True)
    try:
        assert lib.store.version == SCHEMA_VERSION
        conn = sqlite3.connect(db)
        assert conn.execute(rows_sql).fetchall() == before_rows
        conn.close()
        after = stored_vectors(db)
        assert after.keys() == before_vectors.keys()
        assert all(np.array_equal(after[p], before_vectors[p]) for p in after)
        assert lib.metadata(list(file_ids(db).values())) == {}  # nothing read yet
        report = lib.index([root])
        assert report.embedded == 0  # the old vectors stand; only the metadata is read
        assert all(np.array_equal(v, before_vectors[p]) for p, v in stored_vectors(db).items())
        assert len(lib.metadata(list(file_ids(db).values()))) == len(SHOTS)
        hits = lib.search("x", top_k=50, filters=make_filters(camera="canon"))
        assert set(names(hits)) == {"tokyo.jpg", "fiji.jpg", "taveuni.jpg"}
    finally:
        lib.close()


def test_a_changed_photo_gets_its_metadata_read_again(model, photos, tmp_path) -> None:
    root = write_shots(photos, tmp_path / "photos", SHOTS, PLAIN_MTIME)
    lib = Library(tmp_path / "lib.db", model, create=True)
    try:
        lib.index([root])
        target = root / "tokyo.jpg"
        shot = SHOTS[0]._replace(taken="2025:01:01 10:00:00", offset="+01:00", make="Sony", model="A7")
        Image.open(target).convert("RGB").save(target, exif=exif_of(shot))
        os.utime(target, ns=(target.stat().st_mtime_ns + 10**9,) * 2)
        assert lib.index([root]).changed == 1
        meta = by_name(lib)["tokyo.jpg"]
        assert (meta.taken_iso(), meta.camera) == ("2025-01-01T10:00:00+01:00", "Sony A7")
    finally:
        lib.close()


def test_export_parquet_carries_the_metadata(library, tmp_path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "all.parquet"
    assert library.export(out).count == len(SHOTS)
    table = pq.read_table(out).to_pylist()
    rows = {os.path.basename(r["path"]): r for r in table}
    tokyo = rows["tokyo.jpg"]
    assert tokyo["taken"] == "2023-07-14T18:30:05+09:00" and tokyo["taken_offset"] == 32400
    assert (tokyo["make"], tokyo["model"], tokyo["lens"], tokyo["kind"]) == (
        "Canon",
        "EOS R5",
        "RF24-70mm F2.8 L",
        "photo",
    )
    assert tokyo["lat"] == pytest.approx(35.6586, abs=1e-4) and tokyo["width"] > 0
    assert rows["fiji.jpg"]["folder"].endswith(os.sep + "trip")
    assert rows["plain.jpg"]["taken_source"] == "file" and rows["plain.jpg"]["lat"] is None


# -- the gallery's JSON API on a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(model, library, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc")
    settings = ServiceSettings(tags=["dog", "cat"], tags_cache_dir=folder / "tags")
    with serve_app(create_app(settings, model=model, library=library, routers=[gallery.router])) as url:
        yield url


@pytest.mark.parametrize(("spec", "want"), FILTER_TABLE, ids=[json.dumps(s) for s, _ in FILTER_TABLE])
def test_each_filter_through_the_gallery_api(server, library, spec, want) -> None:
    r = httpx.get(f"{server}/api/search", params={"q": "a photo", "k": 50, **spec})
    assert r.status_code == 200, r.text
    assert set(names(r.json()["results"])) == want
    file_id = file_ids(library.path)[str(Path(library.path).parent / "photos" / "tokyo.jpg")]
    r = httpx.post(f"{server}/api/search", params={"id": file_id, "k": 50, **spec})
    assert r.status_code == 200, r.text
    assert set(names(r.json()["results"])) == want


def test_gallery_results_carry_metadata_and_pages_follow_the_cursor(server, library) -> None:
    everything = httpx.get(f"{server}/api/search", params={"q": "a cat", "k": 50}).json()["results"]
    tokyo = next(h for h in everything if h["name"] == "tokyo.jpg")
    assert (tokyo["taken"], tokyo["camera"], tokyo["type"]) == ("2023-07-14T18:30:05+09:00", "Canon EOS R5", "photo")
    assert tokyo["position"] == pytest.approx([35.6586, 139.7454], abs=1e-4)
    seen, cursor = [], None
    while True:
        params = {"q": "a cat", "k": 3, **({"cursor": cursor} if cursor else {})}
        body = httpx.get(f"{server}/api/search", params=params).json()
        seen += body["results"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [h["id"] for h in seen] == [h["id"] for h in everything]
    by_offset = httpx.get(f"{server}/api/search", params={"q": "a cat", "k": 3, "offset": 3}).json()
    assert [h["id"] for h in by_offset["results"]] == [h["id"] for h in everything[3:6]]
    dated = httpx.get(f"{server}/api/search", params={"q": "a cat", "k": 50, "sort": "date"}).json()["results"]
    assert [h["name"] for h in dated][:2] == ["paris.jpg", "tokyo.jpg"]


@pytest.mark.parametrize(
    ("params", "status", "named"),
    [
        ({"after": "not a date"}, 400, "after"),
        ({"near": "1,2"}, 400, "near"),
        ({"type": "gif"}, 400, "type"),
        ({"sort": "name"}, 400, "sort"),
        ({"offset": "-1"}, 422, "offset"),
        ({"cursor": "garbage!"}, 400, "cursor"),
        ({"cursor": gallery.encode_cursor(3, "0123456789abcdef")}, 400, "another search"),
    ],
)
def test_gallery_refuses_bad_filters_and_foreign_cursors(server, params, status, named) -> None:
    r = httpx.get(f"{server}/api/search", params={"q": "a cat", **params})
    assert r.status_code == status, r.text
    assert named in r.text
