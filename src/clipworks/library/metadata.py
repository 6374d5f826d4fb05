"""What a photo says about itself (capture time, place, camera, size), read at index time, and the filters
that select photos by it before they are ranked.

Extraction reads the header only (Pillow opens lazily; the pixels are never decoded here) right after the
indexer hashed the file, so its bytes are in the page cache. Camera metadata is hostile input: any tag of
the wrong type, out of range, or a rational with a zero denominator is dropped on its own, the capture time
falls back to the file's modification time, and the photo is indexed regardless.

Times are stored as UTC epoch seconds (``taken_at``) plus the local offset in seconds east of UTC
(``taken_offset``). EXIF ``DateTimeOriginal`` without ``OffsetTimeOriginal`` is a wall-clock time of an
unknown zone: it is stored as if it were UTC with no offset, so its wall-clock time (what date filters
compare, see `Filters`) is exactly what the camera showed. A file time is an instant; its offset is the
local zone of this machine at that time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from functools import cached_property
from typing import Any, Literal, NamedTuple

import numpy as np

from clipworks.errors import UsageError
from clipworks.library.store import TEXT_ARG, Store, prefix_range, to_bytes

MediaKind = Literal["photo", "video"]
MEDIA_KINDS: tuple[MediaKind, ...] = ("photo", "video")
SortKey = Literal["score", "date"]
SORT_KEYS: tuple[SortKey, ...] = ("score", "date")

# EXIF tags (CIPA DC-008): IFD0, the Exif sub-IFD and the GPS sub-IFD.
MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL, LENS_MODEL = 0x9003, 0x9011, 0xA434
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4
MAX_TEXT = 120  # longer camera strings are garbage or an attack; a real model name is far shorter
MAX_OFFSET_S = 14 * 3600  # UTC+14 is the farthest zone
EARTH_RADIUS_KM = 6371.0088
_EXIF_DATE = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"^\s*([+-])(\d{2}):(\d{2})\s*$")

# The metadata columns of ``files`` (schema 3), in the order `Metadata` holds them.
METADATA_COLUMNS = (
    "taken_at", "taken_offset", "taken_source", "lat", "lon", "make", "model", "lens",
    "width", "height", "orientation", "duration", "kind",
)  # fmt: skip


@dataclass(frozen=True)
class Metadata:
    """One file's metadata as stored; None where the file does not say (or says garbage)."""

    taken_at: float | None  # UTC epoch seconds
    taken_offset: int | None  # seconds east of UTC of the local time it was taken in; None when unknown
    taken_source: str  # "exif", "container" (a video's creation_time) or "file" (the modification time)
    lat: float | None
    lon: float | None
    make: str | None
    model: str | None
    lens: str | None
    width: int | None
    height: int | None
    orientation: int | None
    duration: float | None  # seconds, videos only
    kind: MediaKind = "photo"

    def row(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in METADATA_COLUMNS)

    @property
    def local_time(self) -> float | None:
        """Wall-clock epoch seconds where it was taken: what a date without an offset is compared with."""
        return None if self.taken_at is None else self.taken_at + (self.taken_offset or 0)

    @property
    def camera(self) -> str | None:
        return " ".join(p for p in (self.make, self.model) if p) or None

    def taken_iso(self) -> str | None:
        """The capture time in ISO 8601 with its offset (none when the zone is unknown)."""
        if self.taken_at is None:
            return None
        offset = self.taken_offset or 0
        local = datetime.fromtimestamp(self.taken_at, timezone(timedelta(seconds=offset)))
        text = local.replace(microsecond=0).isoformat()
        return text if self.taken_offset is not None else text[: -len("+00:00")]


# -- extraction ----------------------------------------------------------------------------------------


def extract_metadata(path: str, mtime_ns: int | None = None) -> Metadata:
    """The metadata of the image or video at ``path``; never raises (a file that cannot be opened gets its
    file time)."""
    from PIL import ExifTags

    from clipworks.imaging import is_raw_path
    from clipworks.video.frames import is_video

    if is_video(path):
        return extract_video_metadata(path, mtime_ns)

    size: tuple[int, int] | None = None
    ifd0: Any = {}
    exif: Any = {}
    gps: Any = {}
    try:
        tags, size = _raw_tags(path) if is_raw_path(path) else _image_tags(path)
        ifd0 = dict(tags)
        exif = _sub_ifd(tags, ExifTags.IFD.Exif)
        gps = _sub_ifd(tags, ExifTags.IFD.GPSInfo)
    except Exception:  # Pillow raises many kinds on bad bytes; decoding then reports the file, not this
        pass
    taken = _exif_time(exif.get(DATE_TIME_ORIGINAL), exif.get(OFFSET_TIME_ORIGINAL))
    source = "exif"
    if taken is None:
        taken, source = _file_time(path, mtime_ns), "file"
    lat = _coordinate(gps.get(GPS_LAT), gps.get(GPS_LAT_REF), "N", "S", 90.0)
    lon = _coordinate(gps.get(GPS_LON), gps.get(GPS_LON_REF), "E", "W", 180.0)
    if lat is None or lon is None or (lat == 0.0 and lon == 0.0):  # 0,0 is what cameras without a fix write
        lat = lon = None
    orientation = ifd0.get(ORIENTATION)
    width, height = size if size and all(isinstance(v, int) and 0 < v < 1 << 31 for v in size) else (None, None)
    return Metadata(
        taken_at=None if taken is None else taken[0],
        taken_offset=None if taken is None else taken[1],
        taken_source=source,
        lat=lat,
        lon=lon,
        make=_text(ifd0.get(MAKE)),
        model=_text(ifd0.get(MODEL)),
        lens=_text(exif.get(LENS_MODEL)),
        width=width,
        height=height,
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None,
        duration=None,
    )


def _image_tags(path: str) -> tuple[Any, tuple[int, int]]:
    """The EXIF tags and pixel size of an image Pillow opens (its header only)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels;
            # a chunk before them is already in info, which is where cameras and editors put it.
            tags = Image.Exif()
            if image.info.get("exif"):
                tags.load(image.info["exif"])
        else:
            tags = image.getexif()
        return tags, image.size


# Most camera RAWs (DNG, CR2, NEF, ARW, ...) are TIFF files whose first IFD and Exif IFD lie near the start.
RAW_HEADER_BYTES = 1 << 20


def _raw_tags(path: str) -> tuple[Any, tuple[int, int] | None]:
    """A camera RAW's EXIF tags, read as the TIFF structure at its start (tags pointing past the first MiB
    are dropped), and the size of the picture LibRaw develops (upright), when rawpy is installed."""
    from PIL import Image

    from clipworks.imaging import raw_supported

    tags = Image.Exif()
    with open(path, "rb") as fh:
        head = fh.read(RAW_HEADER_BYTES)
    with contextlib.suppress(Exception):  # CR3, RAF, ORF and RW2 are no plain TIFF: no tags, the size still
        tags.load(head)
    size = None
    if raw_supported():
        import rawpy

        with contextlib.suppress(Exception), rawpy.imread(path) as raw:  # opening reads no pixels
            sizes = raw.sizes
            size = (sizes.height, sizes.width) if sizes.flip in (5, 6) else (sizes.width, sizes.height)
    return tags, size


def extract_video_metadata(path: str, mtime_ns: int | None = None) -> Metadata:
    """A video's duration and frame size from its container header (`clipworks.video.frames.probe`, nothing
    decoded), and its capture time from the container's ``creation_time`` (UTC, as cameras and phones write
    it; shown in this machine's zone, as a file time is), else the file time. A file PyAV cannot open gets
    the file time only: sampling it then fails naming it."""
    from clipworks.video.frames import BadVideo, probe

    duration = width = height = None
    taken: tuple[float, int | None] | None = None
    try:
        info = probe(path)
        duration = info.duration if math.isfinite(info.duration) and info.duration > 0 else None
        if 0 < info.width < 1 << 31 and 0 < info.height < 1 << 31:
            width, height = info.width, info.height
        taken = _container_time(info.created)
    except BadVideo:
        pass
    source = "container"
    if taken is None:
        taken, source = _file_time(path, mtime_ns), "file"
    return Metadata(
        taken_at=None if taken is None else taken[0],
        taken_offset=None if taken is None else taken[1],
        taken_source=source,
        lat=None, lon=None, make=None, model=None, lens=None,
        width=width, height=height, orientation=None, duration=duration, kind="video",
    )  # fmt: skip


def _container_time(value: str | None) -> tuple[float, int | None] | None:
    """(UTC seconds, this machine's offset then) of an ISO 8601 ``creation_time``; None for garbage or the
    zero date (1904 or 1970) that encoders write when they know no time."""
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    seconds = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    if stamp.year < 1980:
        return None
    return seconds, time.localtime(seconds).tm_gmtoff


def _sub_ifd(tags: Any, ifd: int) -> dict[int, Any]:
    try:
        return dict(tags.get_ifd(ifd))
    except Exception:  # a pointer to nowhere, a loop, a truncated directory: no such IFD
        return {}


def _exif_time(value: Any, offset: Any) -> tuple[float, int | None] | None:
    """(UTC epoch seconds, offset seconds or None) of an EXIF date and its offset tag; None for garbage
    (``0000:00:00 00:00:00``, a month 13, a number where text belongs)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not (m := _EXIF_DATE.match(value)):
        return None
    try:
        wall = datetime(*map(int, m.groups()), tzinfo=UTC)  # type: ignore[misc]
    except ValueError:
        return None
    seconds = _offset_seconds(offset)
    return wall.timestamp() - (seconds or 0), seconds


def _offset_seconds(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not (m := _EXIF_OFFSET.match(value)):
        return None
    seconds = (int(m.group(2)) * 60 + int(m.group(3))) * 60 * (-1 if m.group(1) == "-" else 1)
    return seconds if abs(seconds) <= MAX_OFFSET_S and int(m.group(3)) < 60 else None


def _file_time(path: str, mtime_ns: int | None) -> tuple[float, int | None] | None:
    try:
        seconds = (mtime_ns if mtime_ns is not None else os.stat(path).st_mtime_ns) / 1e9
        return seconds, time.localtime(seconds).tm_gmtoff
    except (OSError, OverflowError, ValueError):
        return None


def _coordinate(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals; None for a wrong type, a zero denominator
    (Pillow reads it as NaN), or a value off the globe."""
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    if not isinstance(ref, str) or ref.strip("\x00 ").upper() not in (positive, negative):
        return None
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        return None
    degrees = parts[0] + parts[1] / 60 + parts[2] / 3600
    if degrees > limit:
        return None
    return -degrees if ref.strip("\x00 ").upper() == negative else degrees


def _text(value: Any) -> str | None:
    """A camera string, printable and bounded; None for anything else."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = "".join(c for c in value if c.isprintable()).strip()
    text = text.encode("utf-8", "replace").decode("utf-8")[:MAX_TEXT].strip()  # no lone surrogates reach SQLite
    return text or None


# -- filters -------------------------------------------------------------------------------------------


class TimeBound(NamedTuple):
    seconds: float  # epoch seconds: of UTC when ``utc``, else of the wall-clock time where photos were taken
    utc: bool


@dataclass(frozen=True)
class Near:
    lat: float
    lon: float
    km: float


@dataclass(frozen=True)
class Filters:
    """Which photos a search may return, applied before ranking (see `Filters.rows`).

    ``after`` and ``before`` bound the capture time, both inclusive (`parse_date` turns a plain date for
    ``before`` into the end of that day, so ``2024-06-01`` to ``2024-06-30`` is all of June).
    ``camera`` matches make or model as a case-insensitive substring; ``folder`` holds every photo under
    that folder, at any depth; ``tag`` holds the photos given that tag (``interrogate --write-tags``, ASCII
    case aside). They select rows of the search index before it ranks them (`rows`).
    """

    after: TimeBound | None = None
    before: TimeBound | None = None
    camera: str | None = None
    folder: str | None = None
    near: Near | None = None
    kind: MediaKind | None = None
    tag: str | None = None

    def __bool__(self) -> bool:
        fields = (self.after, self.before, self.camera, self.folder, self.near, self.kind, self.tag)
        return any(v is not None for v in fields)

    def rows(self, facets: Facets, chosen: Sequence[np.ndarray] = ()) -> np.ndarray:
        """The rows (ascending) of a search index these filters let through, from its `Facets`; each of
        ``chosen`` holds the rows one filter found in SQL (`chosen_ids` lists their file ids)."""
        keep = np.ones(len(facets.taken_at), bool)
        for bound, compare in ((self.after, np.greater_equal), (self.before, np.less_equal)):
            if bound is not None:  # an unknown time (NaN) compares false: such a photo never matches
                keep &= compare(facets.taken_at if bound.utc else facets.local, bound.seconds)
        if self.camera is not None:
            needle = self.camera.lower()
            keep &= np.isin(facets.camera, [code for code, name in enumerate(facets.cameras) if needle in name])
        if self.kind is not None:
            keep &= facets.video == (self.kind == "video")
        for rows in chosen:
            inside = np.zeros(len(keep), bool)
            inside[rows] = True
            keep &= inside
        if self.near is not None:
            (low, high), lon_ranges = bounding_box(self.near)
            box = (facets.lat >= low) & (facets.lat <= high)
            if lon_ranges is not None:
                box &= np.logical_or.reduce([(facets.lon >= a) & (facets.lon <= b) for a, b in lon_ranges])
            keep &= box
            candidates = np.flatnonzero(keep)  # the box first, so distances are computed for few rows
            near = self.near
            far = haversine_km(near.lat, near.lon, facets.lat[candidates], facets.lon[candidates]) > near.km
            keep[candidates[far]] = False
        return np.flatnonzero(keep)

    def chosen_ids(self, store: Store) -> list[list[int]]:
        """For each filter given that SQL answers by an index rather than the facets (``folder``: a range
        of the path index; ``tag``: the tag index), the present files it lets through."""
        chosen = []
        if self.folder is not None:
            low, high = prefix_range(self.folder)
            sql = f"SELECT id FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG} AND deleted_at IS NULL"
            chosen.append([i for (i,) in store.conn.execute(sql, (to_bytes(low), to_bytes(high)))])
        if self.tag is not None:
            chosen.append(store.ids_tagged(self.tag))
        return chosen


@dataclass(frozen=True)
class Facets:
    """The filterable metadata of every row of one search index, as arrays in its row order: filtering a
    million photos is then a few vectorised comparisons, not a million ids out of SQLite per query.
    Loaded once per index (that is, once per change of the library); NaN or -1 where unknown."""

    taken_at: np.ndarray  # UTC epoch seconds
    local: np.ndarray  # wall-clock epoch seconds where taken (`Metadata.local_time`)
    lat: np.ndarray
    lon: np.ndarray
    video: np.ndarray  # bool
    camera: np.ndarray  # index into ``cameras``, -1 for none
    cameras: tuple[str, ...]  # each distinct "make model", lower-cased

    @cached_property
    def newest_first(self) -> np.ndarray:
        """Every row, newest wall-clock capture time first, unknown times last; rows of one time (a copy, a
        burst) in row order, so the first one indexed leads."""
        rows = np.arange(len(self.local))
        return np.lexsort((rows, -np.nan_to_num(self.local), np.isnan(self.local)))

    @classmethod
    def load(cls, conn: Any, ids: np.ndarray) -> Facets:
        """The facets of the files ``ids``, read in one snapshot ``conn`` holds."""
        return FileFacets.read(conn).of_rows(ids)


@dataclass(frozen=True)
class FileFacets:
    """What `Facets` holds, a row per present file (``ids`` ascending): kept between changes of a library,
    so that a change reads again only the files it touched (at 10M photos reading every file's row took
    ~30 s and GBs of Python tuples). ``names`` are the distinct "make model" strings as stored, ``camera``
    an index into them (-1: none)."""

    ids: np.ndarray
    table: np.ndarray  # (files, 5): taken_at, taken_offset, lat, lon, 1.0 for a video
    camera: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def read(cls, conn: Any, files: np.ndarray | None = None) -> FileFacets:
        """Every present file's facets (of ``files`` only, when given). The rows are turned into arrays by
        numpy in C (NULL becomes NaN), not value by value in Python."""
        chosen, parameters = "", []
        if files is not None:
            chosen = " AND id IN (SELECT value FROM json_each(?))"
            parameters.append(json.dumps(np.asarray(files, np.int64).tolist()))
        live = f"FROM files WHERE deleted_at IS NULL{chosen} ORDER BY id"
        columns = "id, taken_at, taken_offset, lat, lon, kind = 'video'"
        rows = conn.execute(f"SELECT {columns} {live}", parameters).fetchall()
        table = np.array(rows, np.float64).reshape(-1, 6)
        found = conn.execute(f"SELECT trim(COALESCE(make, '') || ' ' || COALESCE(model, '')) {live}", parameters)
        names = [n for (n,) in found.fetchall()]
        distinct, codes = np.unique(np.array(names or [""], object), return_inverse=True)
        camera = codes[: len(names)].astype(np.int32)
        if "" in distinct:
            camera[camera == list(distinct).index("")] = -1
        return cls(table[:, 0].astype(np.int64), table[:, 1:], camera, tuple(str(n) for n in distinct))

    def updated(self, conn: Any, changed: np.ndarray) -> FileFacets:
        """These facets with the ``changed`` files' read again (gone ones dropped), in snapshot ``conn``."""
        fresh = FileFacets.read(conn, changed)
        kept = np.ones(len(self.ids), bool)
        if len(self.ids):
            at = np.minimum(np.searchsorted(self.ids, changed), len(self.ids) - 1)
            kept[at[self.ids[at] == changed]] = False
        names = list(self.names)
        code_of = {name: code for code, name in enumerate(names)}
        for name in fresh.names:
            if name not in code_of:
                code_of[name] = len(names)
                names.append(name)
        remap = np.array([code_of[name] for name in fresh.names] + [-1], np.int32)  # -1 reads the last slot
        into = np.searchsorted(self.ids[kept], fresh.ids)
        return FileFacets(
            np.insert(self.ids[kept], into, fresh.ids),
            np.insert(self.table[kept], into, fresh.table, axis=0),
            np.insert(self.camera[kept], into, remap[fresh.camera]),
            tuple(names),
        )

    def of_rows(self, ids: np.ndarray) -> Facets:
        """The facets of each of ``ids``'s files (a moment's: its video's), in that order."""
        at = np.searchsorted(self.ids, ids)
        found = at < len(self.ids)
        found[found] = self.ids[at[found]] == ids[found]
        table = np.vstack([self.table, np.full((1, 5), np.nan)])  # the row unknown ids read
        pick = np.where(found, at, len(table) - 1)
        taken, offsets, lat, lon, video = (table[pick, c] for c in range(5))
        return Facets(
            taken_at=taken,
            local=taken + np.nan_to_num(offsets),
            lat=lat,
            lon=lon,
            video=video == 1,
            camera=np.where(found, np.append(self.camera, -1)[pick], -1).astype(np.int32),
            cameras=tuple(name.lower() for name in self.names),  # SQLite's lower() knows ASCII only
        )


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance in km; scalars or arrays."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.subtract(lon2, lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def bounding_box(near: Near) -> tuple[tuple[float, float], list[tuple[float, float]] | None]:
    """Latitude bounds and longitude ranges (None: every longitude, near a pole) holding the circle; a
    circle across the antimeridian gets two longitude ranges."""
    dlat = math.degrees(near.km / EARTH_RADIUS_KM)
    low, high = near.lat - dlat, near.lat + dlat
    if low <= -90 or high >= 90:
        return (max(low, -90.0), min(high, 90.0)), None
    # The widest longitude span of the circle is at the latitude of its tangent points (not its centre).
    ratio = math.sin(near.km / EARTH_RADIUS_KM) / math.cos(math.radians(near.lat))
    if ratio >= 1:
        return (low, high), None
    dlon = math.degrees(math.asin(ratio))
    west, east = near.lon - dlon, near.lon + dlon
    if west < -180:
        return (low, high), [(west + 360, 180.0), (-180.0, east)]
    if east > 180:
        return (low, high), [(west, 180.0), (-180.0, east - 360)]
    return (low, high), [(west, east)]


# -- parsing what a user typed (the CLI and the gallery API share these) -------------------------------


def parse_date(text: str, *, end: bool = False, name: str = "date") -> TimeBound:
    """A bound from ``YYYY-MM-DD`` (its first second, or with ``end`` its last) or an ISO timestamp. A date,
    or a timestamp without an offset, bounds the wall-clock time where each photo was taken; a timestamp
    with one (``+02:00``, ``Z``) is an instant and bounds the UTC time. A bad value raises `UsageError`
    naming ``name``."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
            return TimeBound(start + 86_399.999 if end else start, utc=False)
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name} must be a date YYYY-MM-DD or a timestamp YYYY-MM-DDTHH:MM[:SS][+HH:MM], "
                         f"not {text!r}") from None  # fmt: skip
    if stamp.tzinfo is not None:
        return TimeBound(stamp.timestamp(), utc=True)
    return TimeBound(stamp.replace(tzinfo=UTC).timestamp(), utc=False)


def parse_near(text: str, *, name: str = "near") -> Near:
    """``LAT,LON,KM``: a circle on the globe."""
    parts = text.split(",")
    try:
        lat, lon, km = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{name} must be LAT,LON,KM (e.g. 48.8566,2.3522,5), not {text!r}") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and 0 < km <= 20_040 and all(map(math.isfinite, (lat, lon, km)))):
        raise UsageError(f"{name} needs a latitude in [-90, 90], a longitude in [-180, 180] and 0 < KM <= 20040, "
                         f"not {text!r}")  # fmt: skip
    return Near(lat, lon, km)


def parse_choice(text: str, choices: Sequence[str], name: str) -> str:
    if text not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, not {text!r}")
    return text


def make_filters(
    *,
    after: str | None = None,
    before: str | None = None,
    camera: str | None = None,
    folder: str | None = None,
    near: str | None = None,
    kind: str | None = None,
    tag: str | None = None,
    names: Callable[[str], str] = lambda field: field,
) -> Filters:
    """`Filters` from the text a user typed; ``names`` gives each field the name errors use (``--after``)."""
    low = parse_date(after, name=names("after")) if after is not None else None
    high = parse_date(before, end=True, name=names("before")) if before is not None else None
    if low is not None and high is not None and low.utc == high.utc and low.seconds > high.seconds:
        raise UsageError(f"{names('after')} {after} is later than {names('before')} {before}: nothing can match")
    for field, text in (("camera", camera), ("tag", tag)):
        if text is not None and not text.strip():
            raise UsageError(f"{names(field)} must not be empty")
    return Filters(
        after=low,
        before=high,
        camera=camera.strip() if camera is not None else None,
        # Indexed paths lie under resolved folders: a folder reached through a link must resolve the same way.
        folder=os.path.realpath(os.path.expanduser(folder)) if folder is not None else None,
        near=parse_near(near, name=names("near")) if near is not None else None,
        kind=parse_choice(kind, MEDIA_KINDS, names("type")) if kind is not None else None,  # type: ignore[arg-type]
        tag=tag.strip() if tag is not None else None,
    )


# -- the store's side ----------------------------------------------------------------------------------

UPDATE_METADATA = f"UPDATE files SET {', '.join(f'{c} = ?' for c in METADATA_COLUMNS)} WHERE id = ?"
UNREAD = "taken_source IS NULL"  # a row whose metadata no index run has read yet


def metadata_of(conn: Any, ids: Sequence[int]) -> dict[int, Metadata]:
    """File id -> stored metadata, for the ids whose metadata was read."""
    out: dict[int, Metadata] = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT id, {', '.join(METADATA_COLUMNS)} FROM files WHERE id IN ({marks}) AND NOT {UNREAD}", chunk
        )
        out.update((row[0], Metadata(*row[1:])) for row in rows)
    return out


def camera_counts(conn: Any) -> list[tuple[str, int]]:
    """("make model", present photos) of each camera the library's photos name, most photos first."""
    rows = conn.execute(
        "SELECT trim(COALESCE(make, '') || ' ' || COALESCE(model, '')) AS camera, COUNT(*) FROM files "
        "WHERE deleted_at IS NULL AND NOT " + UNREAD + " GROUP BY camera HAVING camera != '' "
        "ORDER BY COUNT(*) DESC, camera"
    )
    return [(name, count) for name, count in rows]
