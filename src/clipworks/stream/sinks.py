"""Outputs: the events file, the annotated mp4, the drawn overlay, and FPS / per-stage timing."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import numpy as np

from clipworks.errors import UsageError

STAGES = ("decode", "detect", "track", "clip", "draw")


def check_output_file(path: Path, what: str) -> None:
    """Refuse a file that cannot be created (missing folder, a folder in its place) before any frame."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{what} {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"{what} {path}: the folder {path.parent} is not writable")


class EventsSink:
    """One JSON object a line, flushed as written, so ``tail -f`` and a crash both see every event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        check_output_file(path, "--events")
        try:
            self._f: IO[str] | None = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise UsageError(f"--events {path}: cannot write ({e.strerror})") from e

    def write(self, event: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(event) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> EventsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoSink:
    """An mp4 writer (PyAV, H.264 when available else MPEG-4), opened on the first frame's size."""

    def __init__(self, path: Path, fps: float = 10.0) -> None:
        check_output_file(path, "--output")
        self.path = path
        self.fps = max(1, round(fps))
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        if self._container is None:
            try:
                self._container = av.open(str(self.path), "w")
            except (av.error.FFmpegError, OSError) as e:
                raise UsageError(f"--output {self.path}: cannot write ({e})") from e
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self._stream = self._container.add_stream(codec, rate=self.fps)
            h, w = rgb.shape[:2]
            self._stream.width, self._stream.height = w - w % 2, h - h % 2
            self._stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                self._stream.options = {"preset": "veryfast"}
        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StageTimer:
    """Per-stage milliseconds (mean over a sliding window) and processed frames per second."""

    def __init__(self, window: int = 30) -> None:
        self.ms: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self.done: deque[float] = deque(maxlen=window * 4)
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(STAGES, 0)

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage].append(ms)
        self.totals[stage] += ms
        self.counts[stage] += 1

    def tick(self, frames: int = 1) -> None:
        now = time.perf_counter()
        self.done.extend([now] * frames)

    def fps(self) -> float:
        if len(self.done) < 2 or self.done[-1] == self.done[0]:
            return 0.0
        return (len(self.done) - 1) / (self.done[-1] - self.done[0])

    def stage_ms(self) -> dict[str, float]:
        return {s: (sum(v) / len(v) if v else 0.0) for s, v in self.ms.items()}

    def mean_ms(self) -> dict[str, float]:
        return {s: (self.totals[s] / self.counts[s] if self.counts[s] else 0.0) for s in STAGES}


# -- drawing ----------------------------------------------------------------------------------

GREEN, RED, GREY, WHITE = (40, 220, 40), (230, 50, 50), (170, 170, 170), (255, 255, 255)


def draw_label(img: np.ndarray, box: tuple[float, ...], text: str, colour: tuple[int, int, int]) -> None:
    import cv2

    x1, y1, x2, y2 = (int(v) for v in box)
    cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    y = max(y1, th + 4)
    cv2.rectangle(img, (x1, y - th - 4), (x1 + tw + 4, y), colour, -1)
    cv2.putText(img, text, (x1 + 2, y - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)


def draw_lines(img: np.ndarray, lines: list[str], origin: tuple[int, int] = (8, 20)) -> None:
    import cv2

    x, y = origin
    for line in lines:
        cv2.putText(img, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, WHITE, 1, cv2.LINE_AA)
        y += 18


def compose_grid(frames: list[np.ndarray | None], featured: int, width: int = 960) -> np.ndarray:
    """The featured stream large on the left, the others as thumbnails in a column on the right."""
    import cv2

    thumbs = [i for i in range(len(frames)) if i != featured]
    big_w = width * 3 // 4 if thumbs else width
    small_w = width - big_w
    ref = next((f for f in frames if f is not None), None)
    aspect = ref.shape[0] / ref.shape[1] if ref is not None else 0.75
    big_h = int(big_w * aspect) // 2 * 2
    small_h = int(small_w * aspect) if thumbs else 0
    height = max(big_h, small_h * len(thumbs))
    canvas = np.zeros((height - height % 2, width, 3), np.uint8)
    if frames[featured] is not None:
        canvas[:big_h, :big_w] = cv2.resize(frames[featured], (big_w, big_h))
    for k, i in enumerate(thumbs):
        if frames[i] is not None and small_h > 0:
            y = k * small_h
            canvas[y : y + small_h, big_w:width] = cv2.resize(frames[i], (small_w, small_h))
            draw_lines(canvas, [f"#{i}"], (big_w + 4, y + 16))
    cv2.rectangle(canvas, (0, 0), (big_w - 1, big_h - 1), GREEN, 2)
    draw_lines(canvas, [f"featured #{featured}"], (8, big_h - 10))
    return canvas


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else b""
