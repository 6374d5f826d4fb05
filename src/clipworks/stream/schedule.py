"""Which tracked people to classify on a frame: new tracks first, then every ``interval`` s, at most N crops."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class TrackLabel:
    label: str | None = None
    probability: float = 0.0
    passed: bool = False
    probabilities: dict[int, float] = field(default_factory=dict)
    last_time: float | None = None
    last_seen: float = 0.0


class ClassifySchedule:
    """Per-track state: when each track was last classified and its latest label."""

    def __init__(self, interval: float = 1.0, max_crops: int = 8, forget_after: float = 10.0) -> None:
        self.interval = interval
        self.max_crops = max_crops
        self.forget_after = forget_after
        self.tracks: dict[int, TrackLabel] = {}

    def due(self, track_ids: Iterable[int], now: float) -> list[int]:
        """The tracks to classify now: never classified first, then the longest waiting; at most ``max_crops``."""
        waiting: list[tuple[float, int]] = []
        for tid in track_ids:
            state = self.tracks.setdefault(tid, TrackLabel())
            state.last_seen = now
            if state.last_time is None:
                waiting.append((float("-inf"), tid))
            elif now - state.last_time >= self.interval:
                waiting.append((state.last_time, tid))
        waiting.sort()
        self._forget(now)
        return [tid for _, tid in waiting[: self.max_crops]]

    def record(self, tid: int, now: float, label: str | None, probability: float, passed: bool,
               probabilities: dict[int, float]) -> None:  # fmt: skip
        state = self.tracks.setdefault(tid, TrackLabel())
        state.label, state.probability, state.passed = label, probability, passed
        state.probabilities = probabilities
        state.last_time = now

    def _forget(self, now: float) -> None:
        for tid in [t for t, s in self.tracks.items() if now - s.last_seen > self.forget_after]:
            del self.tracks[tid]
