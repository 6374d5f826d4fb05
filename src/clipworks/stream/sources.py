"""Frame sources over PyAV: files, cameras, RTSP/HTTP URLs and the bundled ``demo`` clip.

Each source decodes in its own thread, a one-worker ``clipworks.pipeline.Pipeline`` (PyAV releases the
GIL while decoding). A file read without ``sync`` hands over every frame through a small bounded window,
so the processing loop sets the pace. Live sources, and files played with ``sync`` at their own frame
rate, use the pipeline's latest-frame hand-over: a frame the loop has not taken when the next one arrives
is dropped and counted, so processing never falls behind the source. A camera that disconnects is
reopened with exponential backoff; ``loop`` restarts files.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.errors import ClipworksError
from clipworks.pipeline import Pipeline

CAMERA_RE = re.compile(r"^(/dev/video\d+|\d+)$")
URL_RE = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", re.IGNORECASE)
OPEN_TIMEOUT_S = 5.0
BACKOFF_MAX_S = 30.0


class SourceError(ClipworksError):
    """An input that cannot be opened or read: missing file, not a video, unreachable URL."""


@dataclass
class Frame:
    stream: int
    index: int
    time: float  # seconds: the frame's media time for files, seconds since opening for live sources
    rgb: np.ndarray  # HxWx3 uint8
    decode_ms: float = 0.0


def demo_video() -> Path:
    """The ``demo`` input: ``CLIPWORKS_DEMO_VIDEO`` when set, else a synthetic clip made once in the cache."""
    from clipworks import settings

    chosen = settings.demo_video()
    if chosen is not None:
        return chosen
    out = settings.cache_dir() / "stream" / "demo.mp4"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, suffix=".mp4") as tmp:  # the suffix tells the encoder the container
            write_synthetic_clip(tmp)
    return out


def write_synthetic_clip(path: Path, frames: int = 100, size: tuple[int, int] = (640, 360), fps: int = 10) -> Path:
    """A short clip of moving coloured blocks (no weights, no downloads): enough to see the app run."""
    import av

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = (xx * 255 // w + i * 3) % 256
            img[..., 1] = yy * 255 // h
            img[..., 2] = 96
            for k, colour in enumerate(((230, 40, 40), (40, 200, 60), (250, 230, 60))):
                x = (i * (4 + 3 * k) + 150 * k) % (w - 80)
                y = 60 + 90 * k
                img[y : y + 120, x : x + 60] = colour
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def classify_uri(uri: str) -> str:
    if uri == "demo":
        return "file"
    if CAMERA_RE.match(uri):
        return "camera"
    if URL_RE.match(uri):
        return "url"
    return "file"


class Source:
    """One input, decoded in a background thread. ``read()`` returns the next frame to process."""

    def __init__(self, uri: str, stream: int = 0, *, sync: bool = False, loop: bool = False) -> None:
        self.uri = uri
        self.stream = stream
        self.kind = classify_uri(uri)
        self.sync = sync
        self.loop = loop and self.kind == "file"
        self.live = self.kind != "file"
        self.latest_only = self.live or sync
        self.path: Path | None = None
        self.fps = 0.0
        self.size = (0, 0)
        self.decoded = 0
        self.restarts = 0
        self.error: str | None = None
        self.ended = False
        self._stop = threading.Event()
        self._frames: Pipeline[Frame, Frame] | None = None
        self._container: Any = None
        self._t0 = 0.0

    @property
    def dropped(self) -> int:
        """Frames a live (or ``sync``) source replaced before the loop took them."""
        return self._frames.dropped if self._frames is not None else 0

    # -- opening -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else self.uri

    def open(self) -> Source:
        """Open the input now, so that a missing file or unreachable URL fails with a clear message."""
        if self.uri == "demo":
            self.path = demo_video()
        elif self.kind == "file":
            self.path = Path(self.uri)
            if not self.path.exists():
                raise SourceError(f"input {self.uri}: no such file; check the path")
            if not self.path.is_file():
                raise SourceError(f"input {self.uri}: not a file")
        self._container = self._open_container()
        return self

    def _open_container(self) -> Any:
        import av

        target = str(self.path) if self.path is not None else self.uri
        kwargs: dict[str, Any] = {}
        if self.kind == "camera":
            target = self.uri if self.uri.startswith("/dev/") else f"/dev/video{self.uri}"
            kwargs["format"] = "v4l2"
        elif self.kind == "url":
            kwargs["timeout"] = OPEN_TIMEOUT_S
            if self.uri.lower().startswith("rtsp"):
                kwargs["options"] = {"rtsp_transport": "tcp"}
        try:
            container = av.open(target, **kwargs)
        except (av.error.FFmpegError, OSError) as e:
            what = {"file": "cannot be read as a video", "camera": "camera cannot be opened",
                    "url": "cannot be reached"}[self.kind]  # fmt: skip
            raise SourceError(f"input {self.uri}: {what} ({_one_line(e)})") from e
        if not container.streams.video:
            container.close()
            raise SourceError(f"input {self.uri}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        self.fps = float(stream.guessed_rate or stream.average_rate or 25)
        self.size = (stream.codec_context.width, stream.codec_context.height)
        return container

    # -- the reader thread -------------------------------------------------------------------
    def start(self) -> Source:
        if self._container is None:
            self.open()
        self._t0 = time.perf_counter()
        self._frames = Pipeline(
            lambda frame: frame, self._read_frames(), window=4, latest=self.latest_only, cancel=self._stop,
            name=f"source-{self.stream}",
        ).start()  # fmt: skip
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._frames is not None:
            self._frames.close(timeout=2.0)

    def _read_frames(self) -> Iterator[Frame]:
        """Every frame of the input, across loops and camera reconnects; runs in the pipeline's thread."""
        backoff = 1.0
        index = 0
        container = self._container
        try:
            while not self._stop.is_set():
                try:
                    index = yield from self._decode(container, index)
                    if self.kind == "file" and self.loop and not self._stop.is_set():
                        container.close()
                        container = self._open_container()
                        self.restarts += 1
                        continue
                    if self.kind == "camera" and not self._stop.is_set():
                        raise SourceError(f"input {self.uri}: camera stream ended")
                    return
                except Exception as e:
                    if self.kind == "camera" and not self._stop.is_set():
                        # A camera that disconnects comes back: retry with backoff, and say so.
                        self.error = f"{_one_line(e)}; retrying in {backoff:.0f} s"
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        try:
                            container = self._open_container()
                            self.error = None
                            self.restarts += 1
                            backoff = 1.0
                        except SourceError:
                            pass
                        continue
                    if isinstance(e, SourceError):
                        raise
                    raise SourceError(f"input {self.uri}: {_one_line(e)}") from e
        finally:
            with contextlib.suppress(Exception):
                container.close()

    def _decode(self, container: Any, index: int) -> Generator[Frame, None, int]:
        """The frames of one pass over ``container``; returns the index the next pass starts at."""
        import av

        stream = container.streams.video[0]
        tb = stream.time_base
        start = container.start_time or 0
        wall0 = time.perf_counter()
        media0: float | None = None
        offset = index / self.fps if self.fps else 0.0  # media time keeps growing across loops
        it = container.decode(stream)
        while not self._stop.is_set():
            t_dec = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                return index
            except av.error.FFmpegError as e:
                raise SourceError(f"input {self.uri}: decoding failed ({_one_line(e)})") from e
            rgb = frame.to_ndarray(format="rgb24")
            decode_ms = (time.perf_counter() - t_dec) * 1000
            if self.live:
                t = time.perf_counter() - self._t0
            elif frame.pts is not None:
                t = offset + float(frame.pts * tb) - start / 1_000_000
            else:
                t = offset + index / (self.fps or 25)
            if self.sync and not self.live:
                if media0 is None:
                    media0 = t
                delay = (t - media0) - (time.perf_counter() - wall0)
                if delay > 0:
                    self._stop.wait(delay)
            self.decoded += 1
            yield Frame(self.stream, index, t, rgb, decode_ms)
            index += 1
        return index

    # -- the consumer side --------------------------------------------------------------------
    def read(self, timeout: float = 0.5) -> Frame | None:
        """The next frame, or None when none arrived within ``timeout``; after the end, always None."""
        if self.ended or self._frames is None:
            return None
        try:
            frame = self._frames.poll(timeout)
        except SourceError as e:
            self.error, frame = str(e), None
        if frame is None and self._frames.done:
            self.ended = True
        return frame


def open_sources(uris: list[str], *, sync: bool = False, loop: bool = False, strict: bool = True) -> list[Source]:
    """Open every input. ``strict``: the first broken one raises; else broken ones come back ended, with ``error``."""
    sources = []
    for i, uri in enumerate(uris):
        src = Source(uri, i, sync=sync, loop=loop)
        try:
            src.open()
        except SourceError as e:
            if strict:
                for s in sources:
                    s.stop()
                raise
            src.error, src.ended = str(e), True
        sources.append(src)
    return sources


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
