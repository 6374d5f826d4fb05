"""The photo library on the web: a gallery page and a JSON search API (``clipworks serve --db PATH``, or
``--store postgres://...`` for a shared library: both are a `library.LibraryBase`, read only through its API).

Routes (the library is ``request.app.state.clip.library``; without one every route answers 404):

- ``GET /``: the page (``static/gallery.html``, no build step, nothing fetched from elsewhere);
- ``GET /api/timeline?k=``: the most recent photos, no query needed, newest first by capture time, each
  with its ``month`` (``YYYY-MM``) to group by; the first page also counts the photos of every month;
- ``GET /api/search?q=&k=``: text search in the library's query syntax (``+beach -people 2:cat``);
  the timeline and both searches take the filters ``after``, ``before``, ``camera``, ``folder``, ``near``
  (``LAT,LON,KM``), ``type`` (photo or video) and ``tag`` (stored by ``interrogate --write-tags``), applied
  before ranking, ``sort`` (score or date; the timeline is always by date), ``dedupe`` (fold near-duplicates
  of a page into the first one shown) and paging: ``offset``, or the ``next_cursor`` of the previous page as
  ``cursor``; each hit lists its stored ``tags`` with their scores;
- ``POST /api/search``: by example, as ``?id=`` of an indexed photo (its stored vector, nothing re-encoded),
  a JSON body ``{"image": base64 | "id": n | "path": indexed path, "q": text, "k": n}``, or a multipart
  upload (``image`` file, optional ``q`` and ``k`` fields); ``q`` adds text terms to the example;
- ``GET /api/library``: how many photos, which model, and the cameras and folders the filters can name;
- ``GET /thumb/{id}`` and ``GET /original/{id}``: a cached thumbnail (JPEG; WebP keeping the alpha of an
  image with transparency) and the file itself.

A video is searched as its moments: such a hit has the video's ``id``, ``time`` (seconds into it), a
``thumb`` of that frame (``/thumb/{id}?t=``) and ``play``, ``/original/{id}#t=`` (a media fragment a
``<video>`` element starts at). ``/original`` answers HTTP Range requests (one range; ``Accept-Ranges:
bytes``), which is how a browser seeks in a video without fetching all of it.

Files are named by their database id only: a client never hands the server a path to read (``path`` in
a search body is looked up in the index and refused when it is not there). A file is served only when it
is the one the index recorded: opened once, without following a final symlink, checked by ``fstat`` (a
regular file of the recorded device, inode, size and mtime) and served from that open file, typed by the
format Pillow decodes, never by the name (except a camera RAW, which indexing could only have read through
LibRaw: typed by its extension and sent as a download, since no browser shows one). A photo changed since the
last index run is not served until the next one records it. Texts and uploads are encoded by the service's
single batching worker; the library only supplies stored vectors and file rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NamedTuple
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from clipworks.atomic import atomic_path
from clipworks.errors import UsageError
from clipworks.library.metadata import SORT_KEYS, Filters, make_filters, parse_choice
from clipworks.library.search import combine_terms, parse_query, query_texts
from clipworks.library.store import FileRow
from clipworks.video.frames import BadVideo


class PathsJSONResponse(JSONResponse):
    """JSON in ASCII. A file name that is not UTF-8 reaches here with lone surrogates for its bytes
    (``os.fsdecode``), which a UTF-8 body cannot carry; ASCII JSON writes them as ``\\udcXX``, as the CLI's
    ``--json`` does, so ``os.fsencode(name)`` on the client gives the bytes back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


router = APIRouter(tags=["gallery"], default_response_class=PathsJSONResponse)

PAGE = Path(__file__).with_name("static") / "gallery.html"
NO_LIBRARY = "no photo library is served: start the server with `clipworks serve --db PATH` (or --store URL)"
THUMB_SIZES = (128, 256, 512, 1600)  # 1600: the viewer's large photo, sharp on a phone's 3x screen too
THUMB_TYPES = {".jpg": "image/jpeg", ".webp": "image/webp"}
DEFAULT_K = 24
TIMELINE_K = 60
# Cosine above which two photos of one page count as the same shot (bursts, edits, copies) for ``dedupe``.
DUPLICATE_COSINE = 0.95
MAX_K = 500
# A photo given as an example is one term of the query; its name here only has to be no valid text term.
EXAMPLE = "<example>"
SQLITE_MAX = 2**63 - 1
CHUNK = 1 << 16
# Pillow's names for formats browsers know under another type (MPO: a JPEG with a second picture).
MEDIA_TYPES = {"MPO": "image/jpeg"}
# The containers PyAV (FFmpeg's demuxers) finds, by the demuxer's name, as browsers know them.
VIDEO_TYPES = {
    "mov,mp4,m4a,3gp,3g2,mj2": "video/mp4", "matroska,webm": "video/webm", "avi": "video/x-msvideo",
    "mpeg": "video/mpeg", "mpegts": "video/mp2t", "ogg": "video/ogg", "asf": "video/x-ms-asf",
}  # fmt: skip
# Camera RAW files, by extension, under the types photo tools register for them. No browser shows one, so
# `/original` sends these as downloads; the page shows the RAW's preview (its thumbnails) instead.
RAW_TYPES = {
    ".arw": "image/x-sony-arw", ".cr2": "image/x-canon-cr2", ".cr3": "image/x-canon-cr3",
    ".nef": "image/x-nikon-nef", ".orf": "image/x-olympus-orf", ".raf": "image/x-fuji-raf",
    ".rw2": "image/x-panasonic-rw2", ".dng": "image/x-adobe-dng",
}  # fmt: skip
RANGE = re.compile(r"bytes=(\d*)-(\d*)")

FileId = Annotated[int, PathParam(ge=1, le=SQLITE_MAX, description="The photo's id in the library.")]
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="How many photos to return.")]


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="An example image as base64 or a data URL.")
    id: int | None = Field(default=None, ge=1, le=SQLITE_MAX, description="An indexed photo's id.")
    path: str | None = Field(default=None, description="An indexed photo's path (as the index stores it).")
    q: str | None = Field(default=None, max_length=2000, description="Text terms added to the example.")
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K)


class Page(NamedTuple):
    """Which photos a search ranks (``filters``), in what order, and which page of them."""

    filters: Filters
    sort: str
    dedupe: bool
    offset: int
    cursor: str | None  # stands for an offset, in one search only (see `cursor_key`)
    key: str  # the filters and sort as asked


def page_options(
    after: Annotated[str | None, Query(max_length=40, description="Taken on or after: YYYY-MM-DD or ISO.")] = None,
    before: Annotated[str | None, Query(max_length=40, description="Taken on or before (the whole day).")] = None,
    camera: Annotated[str | None, Query(max_length=200, description="Camera make or model contains this.")] = None,
    folder: Annotated[str | None, Query(max_length=4096, description="Under this indexed folder.")] = None,
    near: Annotated[str | None, Query(max_length=80, description="Within KM of a point: LAT,LON,KM.")] = None,
    type: Annotated[str | None, Query(description="photo or video.")] = None,
    tag: Annotated[
        str | None, Query(max_length=200, description="Given this tag (`interrogate --write-tags`).")
    ] = None,
    sort: Annotated[str, Query(description="score, or date (the same page, newest first).")] = "score",
    dedupe: Annotated[bool, Query(description="Fold near-duplicates on a page into the first one shown.")] = False,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Skip this many of the best.")] = 0,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the page before.")] = None,
) -> Page:
    try:
        filters = make_filters(after=after, before=before, camera=camera, folder=folder, near=near, kind=type, tag=tag)
        parse_choice(sort, SORT_KEYS, "sort")
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    key = json.dumps([after, before, camera, folder, near, type, tag, sort, dedupe])
    return Page(filters, sort, dedupe, offset, cursor, key)


def cursor_key(page: Page, asked: Any, k: int) -> str:
    return hashlib.sha1(json.dumps([page.key, asked, k], sort_keys=True).encode()).hexdigest()[:16]


def encode_cursor(offset: int, key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset, "s": key}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, key: str) -> int:
    """The offset a cursor stands for; 400 for one that is garbage or from another search."""
    try:
        record = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        offset, owner = record["o"], record["s"]
    except (ValueError, KeyError, TypeError) as e:
        raise HTTPException(status_code=400, detail="cursor is not one this API gave: start from the first page") from e
    if owner != key:
        raise HTTPException(status_code=400, detail="cursor belongs to another search: start from its first page")
    if not isinstance(offset, int) or offset < 0:
        raise HTTPException(status_code=400, detail="cursor is not one this API gave: start from the first page")
    return offset


PageOptions = Annotated[Page, Depends(page_options)]


# -- helpers -----------------------------------------------------------------------------------------


def library_of(request: Request) -> Any:
    library = request.app.state.clip.library
    if library is None:
        raise HTTPException(status_code=404, detail=NO_LIBRARY)
    return library


def live_file(library: Any, file_id: int) -> FileRow:
    """The row of a present (indexed, not deleted) file, else 404."""
    row = library.file(file_id)
    if row is None or row.deleted_at is not None:
        raise HTTPException(status_code=404, detail=f"no photo {file_id} in the library")
    return row


class OpenPhoto(NamedTuple):
    row: FileRow
    file: BinaryIO
    stat: os.stat_result


def open_recorded(library: Any, file_id: int) -> OpenPhoto:
    """The indexed file ``file_id``, open, with its ``fstat``; 404 with the reason for anything else.

    One ``open`` (no final symlink followed: the real path was recorded; non-blocking, so a FIFO swapped
    in cannot hang the server) then checks on the open file, so nothing can be swapped in between.
    """
    rec = live_file(library, file_id)
    if rec.error is not None:
        raise HTTPException(status_code=404, detail=f"photo {file_id} could not be read as an image when indexed")
    if not rec.identified:
        raise HTTPException(
            status_code=404, detail=f"photo {file_id} was indexed by an older clipworks: run `clipworks index add`"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(rec.real_path, flags)
    except OSError:
        raise HTTPException(status_code=404, detail=f"photo {file_id} is gone from disk or is a link now") from None
    fh = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not rec.matches(st):
        fh.close()
        raise HTTPException(
            status_code=404,
            detail=f"photo {file_id} was replaced or changed on disk since it was indexed: index it again",
        )
    return OpenPhoto(rec, fh, st)


def media_type(fh: BinaryIO, file_id: int) -> str:
    """The MIME type of the format Pillow finds in the file's header, else of the container PyAV finds (the
    file is left at its start)."""
    from PIL import Image

    try:
        with Image.open(fh) as im:
            fmt = im.format or ""
    except Exception:  # Pillow raises many kinds for bytes that are no image; any of them means "do not serve"
        fmt = ""
    fh.seek(0)
    found = MEDIA_TYPES.get(fmt) or Image.MIME.get(fmt) or video_type(fh)
    if not found:
        fh.close()
        raise HTTPException(status_code=404, detail=f"photo {file_id} is not an image the gallery can serve")
    return found


def video_type(fh: BinaryIO) -> str | None:
    """The MIME type of the video container in ``fh`` (left at its start), None for none PyAV opens."""
    import av

    try:
        with av.open(fh) as container:
            found = VIDEO_TYPES.get(container.format.name) if container.streams.video else None
            codec = container.streams.video[0].codec_context.name if found else ""
    except Exception:  # FFmpeg's errors for bytes it cannot read: not a video to serve
        found = None
    fh.seek(0)
    if found == "video/webm" and codec not in ("vp8", "vp9", "av1"):
        found = "video/x-matroska"  # Matroska holding what WebM does not allow
    return found


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range: bytes=`` request, None to send the whole file (no header,
    or several ranges, which a server may answer whole); 416 for one outside the file."""
    if not header or "," in header:
        return None
    m = RANGE.fullmatch(header.strip())
    if m is None or not (m.group(1) or m.group(2)):
        return None  # not a byte range this server knows: the whole file, as RFC 9110 allows
    if m.group(1):
        first = int(m.group(1))
        last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # the last N bytes
        first, last = max(0, size - int(m.group(2))), size - 1
    if first >= size or last < first:
        raise HTTPException(status_code=416, detail=f"range {header} lies outside the file's {size} bytes",
                            headers={"Content-Range": f"bytes */{size}"})  # fmt: skip
    return first, last


def open_file_path(fh: BinaryIO) -> str:
    """A path that opens the very file ``fh`` has open (``/proc/self/fd/N`` resolves to its inode, not to a
    name someone could swap), for code that takes a path, such as ``render_thumbnail``."""
    fd = fh.fileno()
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else f"/dev/fd/{fd}"


def chunks(fh: BinaryIO, size: int) -> Iterator[bytes]:
    """At most ``size`` bytes of ``fh`` (its fstat size, sent as Content-Length), then close it."""
    try:
        while size > 0 and (chunk := fh.read(min(CHUNK, size))):
            size -= len(chunk)
            yield chunk
    finally:
        fh.close()


def ranked(library: Any, vector: np.ndarray, k: int, page: Page) -> list[tuple[int, float | None]]:
    """The ``k`` best (file id, cosine) of the page's filters and offset for a unit query vector."""
    dim = library.model_row.dim
    if vector.shape != (dim,):
        raise HTTPException(
            status_code=500, detail=f"the served model makes {vector.shape[-1]}-d vectors; the library holds {dim}-d"
        )
    return library.ranked(vector, top_k=k, filters=page.filters, offset=page.offset, sort=page.sort)


def recent(library: Any, k: int, page: Page) -> list[tuple[int, float | None]]:
    """The page's ``k`` most recent photos and videos (no score: nothing was asked)."""
    return [(i, None) for i in library.recent(top_k=k, filters=page.filters, offset=page.offset)]


def described(library: Any, hits: list[tuple[int, float | None]], page: Page) -> list[dict[str, Any]]:
    """Hits (search keys: a photo, or a moment of a video) as the JSON the page renders, with what indexing
    read of each file and its stored tags; with ``dedupe``, a hit whose cosine to one shown before it on the
    page is above `DUPLICATE_COSINE` is left out and counted on that one (``duplicates``). Pages are folded
    one at a time: a near-duplicate on the next page is shown again."""
    keys = [key for key, _ in hits]
    found = library.targets(keys)
    files = [t.file_id for t in found.values()]
    metadata = library.metadata(files)
    tags = library.tags(files)
    first = library.collapse_duplicates(keys, DUPLICATE_COSINE) if page.dedupe else {key: key for key in keys}
    folded = Counter(first[key] for key in keys if first[key] != key)
    out = []
    for key, s in hits:
        if key in found and first[key] == key:
            i, path, at = found[key]
            meta = metadata.get(i)
            out.append(
                {
                    "id": i,
                    "path": path,
                    "name": os.path.basename(path),
                    "score": None if s is None else round(float(s), 6),
                    "thumb": f"/thumb/{i}" if at is None else f"/thumb/{i}?t={at:.3f}",
                    "preview": f"/thumb/{i}?size={THUMB_SIZES[-1]}" + ("" if at is None else f"&t={at:.3f}"),
                    "original": f"/original/{i}",
                    "raw": os.path.splitext(path)[1].lower() in RAW_TYPES,  # the original is a download
                    "time": at,  # seconds into the video; None for a photo
                    "play": None if at is None else f"/original/{i}#t={at:.3f}",
                    "duration": meta.duration if meta else None,
                    "taken": meta.taken_iso() if meta else None,
                    "month": meta.taken_iso()[:7] if meta and meta.taken_at is not None else None,
                    "camera": meta.camera if meta else None,
                    "lens": meta.lens if meta else None,
                    "size": [meta.width, meta.height] if meta and meta.width else None,
                    "position": [meta.lat, meta.lon] if meta and meta.lat is not None else None,
                    "type": meta.kind if meta else None,
                    "tags": [{"tag": tag, "score": round(score, 6)} for tag, score in tags.get(i, [])],
                    "duplicates": folded.get(i, 0),
                }
            )
    return out


def respond(
    library: Any, hits: list[tuple[int, float | None]], k: int, page: Page, key: str, asked: Any, t0: float
) -> dict[str, Any]:
    results = described(library, hits, page)
    return {
        "query": asked,
        "k": k,
        "offset": page.offset,
        # A full page may have more after it; a short one was the last. Folded duplicates count as shown.
        "next_cursor": encode_cursor(page.offset + k, key) if len(hits) == k else None,
        "model": library.model_row.name,
        "count": len(results),
        "hidden": len(hits) - len(results),
        "ms": round((time.perf_counter() - t0) * 1000, 2),
        "results": results,
    }


def paged(page: Page, key: str) -> Page:
    """The page with its cursor, if any, turned into the offset it stands for."""
    return page if page.cursor is None else page._replace(offset=decode_cursor(page.cursor, key))


async def search(
    request: Request, q: str | None, k: int, page: Page, example: np.ndarray | None = None, asked: Any = None
) -> dict[str, Any]:
    """Text terms (encoded on the batching worker) plus an optional example vector -> ranked photos."""
    t0 = time.perf_counter()
    library = library_of(request)
    asked = asked if asked is not None else {"q": q}
    key = cursor_key(page, asked, k)
    page = paged(page, key)
    state = request.app.state.clip
    words = (q or "").split()
    try:
        terms = parse_query(words, images=[EXAMPLE] if example is not None else [])
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    texts = query_texts(terms)
    text_vectors = await state.embed_texts(texts) if texts else None
    try:
        vector = combine_terms(terms, text_vectors, lambda _: example)  # type: ignore[arg-type,return-value]
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    hits = await run_in_threadpool(ranked, library, vector, k, page)
    return await run_in_threadpool(respond, library, hits, k, page, key, asked, t0)


def stored_vector(library: Any, file_id: int) -> np.ndarray:
    live_file(library, file_id)
    vector = library.vector(file_id)
    described = library.metadata([file_id]).get(file_id) if vector is None else None
    if described is not None and described.kind == "video":
        raise HTTPException(status_code=404, detail=f"file {file_id} is a video: search by text or by a photo")
    if vector is None:
        raise HTTPException(status_code=404, detail=f"photo {file_id} has no vector yet (it could not be read)")
    return vector


def stored_vector_by_path(library: Any, path: str) -> tuple[int, np.ndarray]:
    row = library.file_at(path)
    if row is None or row.deleted_at is not None:
        raise HTTPException(status_code=404, detail=f"{path} is not in the library")
    return row.id, stored_vector(library, row.id)


async def upload_vector(request: Request, data: bytes | str) -> np.ndarray:
    from clipworks.service.embeddings import decode_images

    pixels = await decode_images(request, [data])
    return (await request.app.state.clip.embed_images(pixels))[0]


# -- thumbnails --------------------------------------------------------------------------------------


def thumbs_dir(library: Any) -> Path:
    """One folder per library under the cache dir: ids of two libraries must not share thumbnails."""
    from clipworks.settings import cache_dir

    key = hashlib.sha1(library.cache_key.encode()).hexdigest()[:16]
    return cache_dir() / "thumbs" / key


def render_thumbnail(source: str, target: Path, size: int, at: float | None = None) -> Path:
    """Fit ``source`` in ``size`` px (with ``at``, the frame of the video ``source`` shown at that many
    seconds) and write it at ``target`` as a JPEG, or beside it as a WebP keeping the alpha of an image with
    transparency (the page shows that on a checkerboard); returns the file written. A file indexing refuses
    (over the pixel limit, unreadable) is refused here too, before it is decoded: 415 with the reason."""
    from PIL import Image

    from clipworks.errors import BadImage
    from clipworks.imaging import load_thumbnail
    from clipworks.video.frames import frame_at

    try:
        if at is None:
            image = load_thumbnail(source, size, alpha=True)
        else:
            image = frame_at(source, at)
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (BadImage, BadVideo) as e:
        raise HTTPException(status_code=415, detail=f"no thumbnail: {e}") from e
    if image.mode == "RGBA":
        target = target.with_suffix(".webp")
        with atomic_path(target) as tmp:
            image.save(tmp, "WEBP", quality=85)
        return target
    with atomic_path(target) as tmp:  # whole or not at all: a reader never sees half a thumbnail
        image.save(tmp, "JPEG", quality=85, optimize=True)
    return target


def thumbnail(library: Any, file_id: int, fh: BinaryIO, st: os.stat_result, size: int, at: float | None = None) -> Path:
    """The cached thumbnail (of the frame ``at`` seconds into a video), made on the first request from the
    open file; a changed file (size or mtime) gets a new one."""
    folder = thumbs_dir(library)
    stem = f"{file_id}-{size}-{st.st_mtime_ns}-{st.st_size}"
    moment = "" if at is None else f"-t{round(at * 1000)}"
    target = folder / f"{stem}{moment}.jpg"
    for made in (target.with_suffix(suffix) for suffix in THUMB_TYPES):
        if made.is_file():
            return made
    folder.mkdir(parents=True, exist_ok=True)
    try:
        target = render_thumbnail(open_file_path(fh), target, size, at)
    except OSError as e:
        raise HTTPException(status_code=415, detail=f"photo {file_id} cannot be decoded for a thumbnail ({e})") from e
    for stale in folder.glob(f"{file_id}-{size}-*"):
        if stale.suffix in THUMB_TYPES and not stale.name.startswith(stem):
            stale.unlink(missing_ok=True)
    return target


# -- routes ------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page(request: Request) -> Response:
    if request.app.state.clip.library is None:
        body = (
            "<!doctype html><meta charset=utf-8><title>clipworks</title>"
            f"<p>clipworks is running, but {NO_LIBRARY}. The API docs are at <a href=/docs>/docs</a>."
        )
        return HTMLResponse(body, status_code=404)
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/api/library")
def library_info(request: Request) -> dict[str, Any]:
    """How many photos and video moments the gallery searches, and with which model."""
    library = library_of(request)
    try:
        photos, moments = library.key_counts()
        return {
            "photos": photos,
            "moments": moments,
            "model": library.model_row.name,
            "cameras": [{"name": name, "count": count} for name, count in library.cameras()],
            "folders": library.folders(),
        }
    except UsageError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e


@router.get("/api/timeline")
async def timeline(request: Request, page: PageOptions, k: TopK = TIMELINE_K) -> dict[str, Any]:
    """The most recent photos, newest first (no query), paged; the first page counts each month's photos."""
    t0 = time.perf_counter()
    library = library_of(request)
    key = cursor_key(page, {"timeline": True}, k)
    page = paged(page, key)
    try:
        hits = await run_in_threadpool(recent, library, k, page)
        body = await run_in_threadpool(respond, library, hits, k, page, key, {"timeline": True}, t0)
        if page.offset == 0:
            months = await run_in_threadpool(library.month_counts, page.filters)
            body["months"] = [{"month": month, "count": count} for month, count in months]
    except UsageError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e
    return body


@router.get("/api/search")
async def search_text(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=2000, description="Query: `beach -people 2:sunset`.")],
    page: PageOptions,
    k: TopK = DEFAULT_K,
) -> dict[str, Any]:
    """Photos ranked by cosine to a text query (plain words form one prompt; +x, -x, N:x are terms)."""
    return await search(request, q, k, page)


@router.post("/api/search")
async def search_example(
    request: Request,
    page: PageOptions,
    id: Annotated[int | None, Query(ge=1, le=SQLITE_MAX, description="Search by this indexed photo.")] = None,
    k: Annotated[int | None, Query(ge=1, le=MAX_K)] = None,
) -> dict[str, Any]:
    """Photos like an example: ``?id=`` of an indexed photo, or a JSON / multipart body with the image."""
    library = library_of(request)
    q: str | None = None
    body_k: int | None = None
    example: np.ndarray
    asked: dict[str, Any]
    ctype = request.headers.get("content-type", "")
    if id is not None:
        example = await run_in_threadpool(stored_vector, library, id)
        asked = {"id": id}
    elif ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(status_code=422, detail="send the example as a file field named 'image'")
        q = str(form.get("q") or "") or None
        try:
            body_k = int(str(form["k"])) if form.get("k") else None
        except ValueError as e:
            raise HTTPException(status_code=422, detail=f"k must be an integer, not {form['k']!r}") from e
        example = await upload_vector(request, await upload.read())
        asked = {"image": upload.filename or "upload"}
    else:
        try:
            body = SearchBody.model_validate_json(await request.body())
        except ValidationError as e:
            raise HTTPException(
                status_code=422, detail=e.errors(include_url=False, include_context=False, include_input=False)
            ) from e
        given = [name for name in ("image", "id", "path") if getattr(body, name) is not None]
        if len(given) != 1:
            raise HTTPException(status_code=422, detail="give exactly one example: 'image', 'id' or 'path'")
        q, body_k = body.q, body.k
        if body.image is not None:
            example = await upload_vector(request, body.image)
            asked = {"image": "base64"}
        elif body.id is not None:
            example = await run_in_threadpool(stored_vector, library, body.id)
            asked = {"id": body.id}
        else:
            file_id, example = await run_in_threadpool(stored_vector_by_path, library, body.path)
            asked = {"id": file_id}
    top_k = k or body_k or DEFAULT_K
    if not 1 <= top_k <= MAX_K:
        raise HTTPException(status_code=422, detail=f"k must be between 1 and {MAX_K}, not {top_k}")
    if q:
        asked["q"] = q
    return await search(request, q, top_k, page, example=example, asked=asked)


@router.get("/thumb/{file_id}", responses={200: {"content": {"image/jpeg": {}, "image/webp": {}}}})
def thumb(
    request: Request,
    file_id: FileId,
    size: Annotated[int, Query(description=f"Longest side in pixels, one of {THUMB_SIZES}.")] = 256,
    t: Annotated[float | None, Query(ge=0, le=1e7, description="For a video: the frame at these seconds.")] = None,
) -> Response:
    """A thumbnail of an indexed photo (JPEG, or WebP with alpha), or of a video's frame at ``t`` (default:
    its first), made once and cached on disk."""
    if size not in THUMB_SIZES:
        raise HTTPException(status_code=422, detail=f"size must be one of {', '.join(map(str, THUMB_SIZES))}")
    library = library_of(request)
    _, fh, st = open_recorded(library, file_id)
    with fh:
        video = library.metadata([file_id]).get(file_id)
        at = (t or 0.0) if video is not None and video.kind == "video" else None
        moment = "" if at is None else f"-t{round(at * 1000)}"
        etag = f'"{file_id}-{size}-{st.st_mtime_ns}-{st.st_size}{moment}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        made = thumbnail(library, file_id, fh, st, size, at)
        return FileResponse(made, media_type=THUMB_TYPES[made.suffix], headers=headers)


@router.get("/original/{file_id}")
def original(request: Request, file_id: FileId) -> Response:
    """The indexed photo or video itself, as the file the index recorded (see the module notes); one byte
    range of it for a ``Range`` request (206), as a browser asks when it seeks in a video."""
    library = library_of(request)
    rec, fh, st = open_recorded(library, file_id)
    # Indexing decoded a RAW through LibRaw (rec.error is None) and the file is unchanged since: its extension
    # names its format. Pillow would take a DNG for a TIFF, which no browser shows either.
    raw_type = RAW_TYPES.get(os.path.splitext(rec.path)[1].lower())
    try:
        kind = raw_type or media_type(fh, file_id)
        wanted = byte_range(request.headers.get("range"), st.st_size)
    except BaseException:
        fh.close()
        raise
    name = os.path.basename(rec.path)
    first, last = wanted or (0, st.st_size - 1)
    disposition = "attachment" if raw_type else "inline"
    headers = {
        "Content-Length": str(last - first + 1),
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"{disposition}; filename*=utf-8''{quote(name, errors='replace')}",  # any name
        "Cache-Control": "private, max-age=300",
        "X-Content-Type-Options": "nosniff",  # the type is the decoded format's; no browser guessing
    }
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{st.st_size}"
        fh.seek(first)
    # The generator closes the file when the body is sent; the task when the client left before that.
    body = chunks(fh, last - first + 1)
    return StreamingResponse(body, status_code=206 if wanted else 200, media_type=kind, headers=headers,
                             background=BackgroundTask(fh.close))  # fmt: skip
