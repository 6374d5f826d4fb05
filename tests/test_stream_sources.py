"""Live-source behaviour: a slow consumer gets the newest frame and the skipped ones are counted; a camera
that disconnects is retried with doubling backoff and comes back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pytest

from clipworks.stream.sources import Frame, Source, SourceError


def test_a_slow_consumer_never_falls_behind_a_synced_source(test_data: Path) -> None:
    source = Source(str(test_data / "videos" / "vtest.avi"), sync=True).start()  # plays at its 10 fps
    try:
        start = time.perf_counter()
        read: list[Frame] = []
        while time.perf_counter() - start < 2.0:
            frame = source.read(timeout=1.0)
            assert frame is not None
            read.append(frame)
            time.sleep(0.35)  # processing slower than the source: ~3.5 frames arrive per frame taken
        elapsed = time.perf_counter() - start
    finally:
        source.stop()
    gaps = [b.index - a.index for a, b in itertools.pairwise(read)]
    assert min(gaps) >= 2  # frames in between were skipped, not queued
    assert source.dropped >= sum(g - 1 for g in gaps) - 1  # and counted
    # The frame handed over is the newest: its media time keeps up with the wall clock.
    assert read[-1].time == pytest.approx(elapsed, abs=0.6)


class _RecordingStop(threading.Event):
    """The source's stop event, recording each backoff wait and returning at once (no real sleeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout >= 1.0:
            self.waits.append(timeout)
        return super().wait(0.001 if timeout is not None else None)


def test_a_camera_that_disconnects_is_retried_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    def fake_open(self: Source) -> object:
        events.append("open")
        if events.count("open") == 2:  # still unplugged at the first retry
            raise SourceError(f"input {self.uri}: camera cannot be opened (No such device)")
        return object()

    def fake_decode(self: Source, container: object, index: int) -> Generator[Frame, None, int]:
        events.append("decode")
        if events.count("open") < 3:
            raise SourceError(f"input {self.uri}: decoding failed (device unplugged)")
        yield Frame(self.stream, index, 0.0, np.zeros((4, 4, 3), np.uint8))
        return index + 1

    monkeypatch.setattr(Source, "_open_container", fake_open)
    monkeypatch.setattr(Source, "_decode", fake_decode)
    source = Source("/dev/video7")
    assert source.kind == "camera" and source.live
    source._stop = _RecordingStop()
    source.start()
    try:
        frame = source.read(timeout=5.0)
    finally:
        source.stop()
    assert frame is not None  # frames flow again after the camera came back
    assert source.restarts >= 1
    assert source._stop.waits[:2] == [1.0, 2.0]  # 1 s, then doubled after the failed reopen
