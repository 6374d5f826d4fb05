"""The photo library on the web: a gallery page and a JSON search API (``clipworks serve --db PATH``).

Routes (the library is ``request.app.state.clip.library``; without one every route answers 404):

- ``GET /``: the page (``static/gallery.html``, no build step, nothing fetched from elsewhere);
- ``GET /api/search?q=&k=``: text search in the library's query syntax (``+beach -people 2:cat``);
- ``POST /api/search``: by example, as ``?id=`` of an indexed photo (its stored vector, nothing re-encoded),
  a JSON body ``{"image": base64 | "id": n | "path": indexed path, "q": text, "k": n}``, or a multipart
  upload (``image`` file, optional ``q`` and ``k`` fields); ``q`` adds text terms to the example;
- ``GET /api/library``: how many photos and which model;
- ``GET /thumb/{id}`` and ``GET /original/{id}``: a cached JPEG thumbnail and the file itself.

Files are named by their database id only: a client never hands the server a path to read (``path`` in
a search body is looked up in the index and refused when it is not there). Texts and uploads are encoded
by the service's single batching worker; the library only supplies stored vectors and file rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from clipworks.atomic import atomic_path
from clipworks.errors import UsageError
from clipworks.library.search import combine, parse_query
from clipworks.library.store import FILE_COLUMNS, FileRow

router = APIRouter(tags=["gallery"])

PAGE = Path(__file__).with_name("static") / "gallery.html"
NO_LIBRARY = "no photo library is served: start the server with `clipworks serve --db PATH`"
THUMB_SIZES = (128, 256, 512)
DEFAULT_K = 24
MAX_K = 500
# A photo given as an example is one term of the query; its name here only has to be no valid text term.
EXAMPLE = "<example>"
SQLITE_MAX = 2**63 - 1

FileId = Annotated[int, PathParam(ge=1, le=SQLITE_MAX, description="The photo's id in the library.")]
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="How many photos to return.")]


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="An example image as base64 or a data URL.")
    id: int | None = Field(default=None, ge=1, le=SQLITE_MAX, description="An indexed photo's id.")
    path: str | None = Field(default=None, description="An indexed photo's path (as the index stores it).")
    q: str | None = Field(default=None, max_length=2000, description="Text terms added to the example.")
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K)


# -- helpers -----------------------------------------------------------------------------------------


def library_of(request: Request) -> Any:
    library = request.app.state.clip.library
    if library is None:
        raise HTTPException(status_code=404, detail=NO_LIBRARY)
    return library


def live_file(library: Any, file_id: int) -> FileRow:
    """The row of a present (indexed, not deleted) file, else 404."""
    row = library.store.conn.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
    if row is None or row[6] is not None:
        raise HTTPException(status_code=404, detail=f"no photo {file_id} in the library")
    return FileRow(*row)


def file_on_disk(row: FileRow) -> os.stat_result:
    try:
        st = os.stat(row.path)
    except OSError:
        st = None
    if st is None or not os.path.isfile(row.path):
        raise HTTPException(status_code=404, detail=f"photo {row.id} is in the index but gone from disk")
    return st


def ranked(library: Any, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The ``k`` best photos for a unit query vector, as the JSON the page renders."""
    dim = library.model_row.dim
    if vector.shape != (dim,):
        raise HTTPException(
            status_code=500, detail=f"the served model makes {vector.shape[-1]}-d vectors; the library holds {dim}-d"
        )
    ids, scores = library.vectors().top_k(vector, k)
    paths = library.store.paths_of(ids)
    out = []
    for i, s in zip(ids.tolist(), scores.tolist(), strict=True):
        if i in paths:
            out.append(
                {
                    "id": i,
                    "path": paths[i],
                    "name": os.path.basename(paths[i]),
                    "score": round(float(s), 6),
                    "thumb": f"/thumb/{i}",
                    "original": f"/original/{i}",
                }
            )
    return out


async def search(
    request: Request, q: str | None, k: int, example: np.ndarray | None = None, asked: Any = None
) -> dict[str, Any]:
    """Text terms (encoded on the batching worker) plus an optional example vector -> ranked photos."""
    t0 = time.perf_counter()
    library = library_of(request)
    state = request.app.state.clip
    words = (q or "").split()
    try:
        terms = parse_query(words, images=[EXAMPLE] if example is not None else [])
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    texts = [t for t in terms if t.kind == "text"]
    vectors: list[np.ndarray] = []
    weights: list[float] = []
    if texts:
        vectors += list(await state.embed_texts([t.value for t in texts]))
        weights += [t.weight for t in texts]
    for term in terms:
        if term.kind == "image":
            vectors.append(example)  # type: ignore[arg-type]
            weights.append(term.weight)
    try:
        vector = combine(np.stack(vectors), weights)
    except UsageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    results = await run_in_threadpool(ranked, library, vector, k)
    return {
        "query": asked if asked is not None else {"q": q},
        "k": k,
        "model": library.model_row.name,
        "count": len(results),
        "ms": round((time.perf_counter() - t0) * 1000, 2),
        "results": results,
    }


def stored_vector(library: Any, file_id: int) -> np.ndarray:
    live_file(library, file_id)
    vector = library.store.vector(library.model_row, file_id)
    if vector is None:
        raise HTTPException(status_code=404, detail=f"photo {file_id} has no vector yet (it could not be read)")
    return vector


def stored_vector_by_path(library: Any, path: str) -> tuple[int, np.ndarray]:
    row = library.store.file_by_path(path)
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

    key = hashlib.sha1(str(Path(library.path).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "thumbs" / key


def render_thumbnail(source: str, target: Path, size: int) -> None:
    """Fit ``source`` in ``size`` px and write it as a JPEG. A file indexing refuses (over the pixel limit,
    unreadable) is refused here too, before it is decoded: 415 with the reason."""
    from clipworks.errors import BadImage
    from clipworks.imaging import load_thumbnail

    try:
        image = load_thumbnail(source, size)
    except BadImage as e:
        raise HTTPException(status_code=415, detail=f"no thumbnail: {e}") from e
    with atomic_path(target) as tmp:  # whole or not at all: a reader never sees half a thumbnail
        image.save(tmp, "JPEG", quality=85, optimize=True)


def thumbnail(library: Any, row: FileRow, st: os.stat_result, size: int) -> Path:
    """The cached thumbnail, made on the first request; a changed file (size or mtime) gets a new one."""
    folder = thumbs_dir(library)
    target = folder / f"{row.id}-{size}-{st.st_mtime_ns}-{st.st_size}.jpg"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    try:
        render_thumbnail(row.path, target, size)
    except OSError as e:
        raise HTTPException(status_code=415, detail=f"photo {row.id} cannot be decoded for a thumbnail ({e})") from e
    for stale in folder.glob(f"{row.id}-{size}-*.jpg"):
        if stale != target:
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
    """How many photos the gallery searches, and with which model."""
    library = library_of(request)
    try:
        return {"photos": len(library.vectors()), "model": library.model_row.name}
    except UsageError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e


@router.get("/api/search")
async def search_text(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=2000, description="Query: `beach -people 2:sunset`.")],
    k: TopK = DEFAULT_K,
) -> dict[str, Any]:
    """Photos ranked by cosine to a text query (plain words form one prompt; +x, -x, N:x are terms)."""
    return await search(request, q, k)


@router.post("/api/search")
async def search_example(
    request: Request,
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
    return await search(request, q, top_k, example=example, asked=asked)


@router.get("/thumb/{file_id}", responses={200: {"content": {"image/jpeg": {}}}})
def thumb(
    request: Request,
    file_id: FileId,
    size: Annotated[int, Query(description=f"Longest side in pixels, one of {THUMB_SIZES}.")] = 256,
) -> Response:
    """A JPEG thumbnail of an indexed photo, made once and cached on disk."""
    if size not in THUMB_SIZES:
        raise HTTPException(status_code=422, detail=f"size must be one of {', '.join(map(str, THUMB_SIZES))}")
    library = library_of(request)
    row = live_file(library, file_id)
    st = file_on_disk(row)
    etag = f'"{file_id}-{size}-{st.st_mtime_ns}-{st.st_size}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return FileResponse(thumbnail(library, row, st, size), media_type="image/jpeg", headers=headers)


@router.get("/original/{file_id}")
def original(request: Request, file_id: FileId) -> Response:
    """The indexed photo itself."""
    row = live_file(library_of(request), file_id)
    file_on_disk(row)
    return FileResponse(
        row.path,
        filename=os.path.basename(row.path),
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=300"},
    )
