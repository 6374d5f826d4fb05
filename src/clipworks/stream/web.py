"""The live page of ``clipworks stream --web HOST:PORT``: annotated video and Hailo's prompt panel.

A small FastAPI app served by uvicorn in a background thread of the stream process:

- ``GET /``: the page (``static/stream.html``: plain HTML and JS, nothing fetched from elsewhere);
- ``GET /video.mjpg``: ``multipart/x-mixed-replace`` JPEGs of the newest annotated frame (the grid with the
  featured stream large in multi-stream mode), at most ``MAX_FPS`` a second; a slow client skips frames;
- ``GET /api/state[?track=N&stream=S]``: threshold, the rows (text, negative, ensemble), the newest
  probabilities per row (of the stream's newest classification, or of track N), the label, whether it
  passed, and the processing fps;
- ``POST /api/prompts``: ``{"index": i, "text", "negative", "ensemble"}`` edits one row,
  ``{"entries": [...]}`` replaces the set (six rows at most), ``{"threshold": t}`` sets the threshold;
  they combine in one request;
- ``POST /api/save`` / ``POST /api/load``: write / re-read the ``--json-path`` file (Hailo's format).

Every request passes ``clipworks.webguard`` first, as ``clipworks serve``'s do: host allow-list, same-origin
POSTs, JSON bodies of at most ``MAX_BODY_BYTES``, strict JSON, and the optional API key (a browser logs in at
``/login``).

The web layer never touches the model: edits are posted to the ``PromptState`` and the processing loop
runs them (encoding changed texts) between frames, so an edit shows in the probabilities of the next frame.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from clipworks.errors import ClipworksError
from clipworks.prompts import HAILO_SLOTS
from clipworks.stream.sinks import encode_jpeg
from clipworks.webguard import GuardPolicy, WebGuard

STATIC = Path(__file__).resolve().parent / "static"
MAX_FPS = 15.0
MAX_TEXT = 200  # characters in one prompt
EDIT_TIMEOUT_S = 10.0  # how long a request waits for the loop to apply its edit (a text encode included)
BOUNDARY = "frame"
MAX_BODY_BYTES = 64 * 1024  # six prompt rows of 200 characters fit many times over


class LiveView:
    """The newest annotated frame; encoded to JPEG only when a client asks, once per frame for all clients."""

    def __init__(self) -> None:
        self.seq = 0
        self.closed = False
        self._rgb: np.ndarray | None = None
        self._jpeg: tuple[int, bytes] = (0, b"")
        self._lock = threading.Lock()

    def publish(self, rgb: np.ndarray) -> None:
        self._rgb = rgb  # the loop hands over a fresh array each frame and never writes to it again
        self.seq += 1

    def jpeg(self) -> tuple[int, bytes]:
        with self._lock:
            seq, rgb = self.seq, self._rgb
            if rgb is not None and self._jpeg[0] != seq:
                self._jpeg = (seq, encode_jpeg(rgb))
            return self._jpeg


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field("", max_length=MAX_TEXT)
    negative: bool = False
    ensemble: bool = False


class PromptUpdate(BaseModel):
    """One row (``index`` with its fields), the whole set (``entries``), the threshold, or a mix."""

    model_config = ConfigDict(extra="forbid")
    index: int | None = Field(None, ge=0, lt=HAILO_SLOTS)
    text: str | None = Field(None, max_length=MAX_TEXT)
    negative: bool | None = None
    ensemble: bool | None = None
    entries: list[Row] | None = Field(None, max_length=HAILO_SLOTS)
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> PromptUpdate:
        row_fields = (self.text, self.negative, self.ensemble)
        if self.index is None and any(v is not None for v in row_fields):
            raise ValueError("text, negative and ensemble edit one row: give its index (0 to 5) too")
        if self.index is not None and self.entries is not None:
            raise ValueError("give either index (one row) or entries (the whole set), not both")
        if self.index is None and self.entries is None and self.threshold is None:
            raise ValueError("nothing to change: give index and its fields, entries, or threshold")
        return self


def error_body(path: str, status: int, detail: Any) -> dict[str, Any]:
    """This page's error shape (the page shows ``error``)."""
    return {"error": detail}


def create_web_app(stream: Any, view: LiveView, policy: GuardPolicy | None = None) -> FastAPI:
    """The page and its API over a ``StreamApp`` (``stream.prompts`` is its ``PromptState``).

    ``policy``: the API key and allowed hosts (default: no key, loopback and IP addresses only)."""
    app = FastAPI(title="clipworks stream", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(WebGuard, policy=policy or GuardPolicy(max_body_bytes=MAX_BODY_BYTES, error_body=error_body))
    prompts = stream.prompts

    async def run_edit(edit: Any) -> None:
        # Posted to the loop; a loop that is not running (inputs not started yet, or stopping) times out.
        fut = prompts.submit(edit)
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), EDIT_TIMEOUT_S)
        except TimeoutError as e:
            fut.cancel()
            raise HTTPException(503, "the stream is not processing frames; try again") from e
        except ClipworksError as e:
            raise HTTPException(400, str(e)) from e

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "stream.html").read_text(encoding="utf-8"))

    @app.get("/api/state")
    def state(
        track: Annotated[int | None, Query(ge=0)] = None,
        stream_index: Annotated[int | None, Query(alias="stream")] = None,
    ) -> dict[str, Any]:
        return snapshot(stream, track, stream_index)

    @app.post("/api/prompts")
    async def edit_prompts(update: PromptUpdate) -> dict[str, Any]:
        current = prompts.current.entries
        rows: dict[int, tuple[str, bool, bool]] | None = None
        replace = None
        if update.index is not None:
            if update.index >= len(current):
                raise HTTPException(400, f"prompt row {update.index} does not exist (0 to {len(current) - 1})")
            old = current[update.index]
            rows = {update.index: (old.text if update.text is None else update.text,
                                   old.negative if update.negative is None else update.negative,
                                   old.ensemble if update.ensemble is None else update.ensemble)}  # fmt: skip
        if update.entries is not None:
            replace = [(r.text, r.negative, r.ensemble) for r in update.entries]
        await run_edit(lambda: prompts.update(rows, update.threshold, replace=replace))
        return prompts.to_json()

    @app.post("/api/save")
    def save() -> dict[str, Any]:
        try:
            path = prompts.save()
        except (ClipworksError, OSError) as e:
            raise HTTPException(400, f"cannot save the prompts: {e}") from e
        return {"saved": str(path), **prompts.to_json()}

    @app.post("/api/load")
    async def load() -> dict[str, Any]:
        await run_edit(prompts.load)
        return {"loaded": str(prompts.path), **prompts.to_json()}

    @app.get("/video.mjpg")
    async def video() -> StreamingResponse:
        return StreamingResponse(mjpeg(view), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.exception_handler(HTTPException)
    async def _error(request: Any, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, exc.status_code, exc.detail), status_code=exc.status_code)

    return app


async def mjpeg(view: LiveView) -> Any:
    """Parts of the newest frame, at most ``MAX_FPS`` a second; frames that arrive in between are skipped."""
    sent = 0
    while not view.closed:
        t0 = time.monotonic()
        if view.seq != sent:
            sent, data = await run_in_threadpool(view.jpeg)
            if data:
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                       + data + b"\r\n")  # fmt: skip
        await asyncio.sleep(max(0.0, 1.0 / MAX_FPS - (time.monotonic() - t0)))


def snapshot(stream: Any, track: int | None = None, stream_index: int | None = None) -> dict[str, Any]:
    """What the page draws: the prompt rows, the probabilities of one classification, and the fps."""
    prompts = stream.prompts
    ps = prompts.current
    index = stream.featured if stream_index is None else stream_index
    latest = dict(stream.latest.get(index) or {})
    result: dict[str, Any] | None = latest.get("result")
    found = True
    if track is not None:
        sched = stream.schedules.get(index)
        lab = sched.tracks.get(track) if sched is not None else None
        found = lab is not None
        result = None
        if lab is not None and lab.label is not None:
            result = {"label": lab.label, "probability": round(lab.probability, 4), "passed": lab.passed,
                      "probabilities": dict(lab.probabilities), "time": lab.last_time, "track_id": track}  # fmt: skip
    probs = (result or {}).get("probabilities", {})
    entries = [
        {
            "text": e.text,
            "negative": e.negative,
            "ensemble": e.ensemble,
            "active": e.active,
            "probability": probs.get(i) if e.active else None,
        }
        for i, e in enumerate(ps.entries)
    ]
    return {
        "threshold": ps.threshold,
        "online": prompts.online,
        "path": str(prompts.path),
        "version": prompts.version,
        "entries": entries,
        "stream": index,
        "streams": len(stream.sources),
        "track": track,
        "track_found": found,
        "tracks": sorted(latest.get("tracks", {})),
        "person_mode": stream.person,
        "result": result,
        "label": (result or {}).get("label"),
        "passed": (result or {}).get("passed"),
        "fps": round(stream.timer.fps(), 1),
        "running": stream.running,
    }


class WebServer:
    """uvicorn in a daemon thread; ``start()`` returns once the socket listens, ``stop()`` ends it.

    ``api_key``: required of every request (a browser logs in at ``/login``); ``allowed_hosts``: host names
    answered besides the bound one, IP addresses, localhost and this machine's name."""

    def __init__(
        self,
        stream: Any,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        api_key: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        import uvicorn

        self.view = LiveView()
        policy = GuardPolicy(api_key=api_key, allowed_hosts=(host, *allowed_hosts), max_body_bytes=MAX_BODY_BYTES,
                             error_body=error_body)  # fmt: skip
        self.app = create_web_app(stream, self.view, policy)
        # Open MJPEG responses never finish on their own: give shutdown a short grace period.
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1, lifespan="off")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="stream-web", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ClipworksError(f"--web {self.host}:{self.port}: cannot listen there (port in use?)")
            if time.monotonic() > deadline:
                raise ClipworksError(f"--web {self.host}:{self.port}: the server did not start in {timeout:.0f} s")
            time.sleep(0.02)
        if self.port == 0:  # an ephemeral port (tests): report the one the OS chose
            self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.view.closed = True
        self.server.should_exit = True
        self.thread.join(timeout=5.0)
