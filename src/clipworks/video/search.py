"""Search inside videos: the frames whose embeddings best match a text, one moment per scene."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipworks.ops import l2_normalize
from clipworks.video.features import VideoFeatures


@dataclass(frozen=True)
class Moment:
    video: str
    timestamp_ms: float
    score: float  # cosine similarity

    @property
    def clock(self) -> str:
        """``H:MM:SS.mmm``, the way video players show a position."""
        from clipworks.display import clock

        return clock(self.timestamp_ms / 1000, decimals=3, hour_digits=1)


def top_moments(
    query: np.ndarray, videos: Sequence[VideoFeatures], top_k: int = 10, min_gap_ms: float = 1000.0
) -> list[Moment]:
    """The ``top_k`` best frames over all videos, best first. Within a video, a frame closer than
    ``min_gap_ms`` to a better one is left out, so one long scene does not fill every place."""
    q = l2_normalize(np.asarray(query, np.float32).reshape(-1))
    candidates: list[Moment] = []
    for video in videos:
        if len(video.embeddings) == 0:
            continue
        scores = l2_normalize(np.asarray(video.embeddings, np.float32)) @ q
        kept: list[float] = []
        for i in np.argsort(-scores, kind="stable"):
            t = float(video.timestamps_ms[i])
            if all(abs(t - k) >= min_gap_ms for k in kept):
                kept.append(t)
                candidates.append(Moment(str(video.path), t, float(scores[i])))
                if len(kept) == top_k:
                    break
    candidates.sort(key=lambda m: -m.score)
    return candidates[:top_k]
