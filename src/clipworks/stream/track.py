"""Multi-object tracking with ByteTrack from roboflow's ``trackers`` (supervision's tracker moved there)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Track:
    id: int
    box: tuple[float, float, float, float]  # xyxy pixels
    score: float


class PersonTracker:
    """ByteTrack over per-frame detections; only confirmed tracks (an id >= 0) are returned."""

    def __init__(self, frame_rate: float = 10.0, *, lost_track_buffer: int = 30) -> None:
        from trackers import ByteTrackTracker

        self._tracker = ByteTrackTracker(
            frame_rate=frame_rate,
            lost_track_buffer=lost_track_buffer,
            track_activation_threshold=0.3,
            high_conf_det_threshold=0.5,
            minimum_consecutive_frames=1,
        )

    def update(self, boxes: np.ndarray, scores: np.ndarray) -> list[Track]:
        import supervision as sv

        det = sv.Detections(
            xyxy=np.asarray(boxes, np.float32).reshape(-1, 4),
            confidence=np.asarray(scores, np.float32).reshape(-1),
            class_id=np.zeros(len(scores), int),
        )
        out = self._tracker.update(det)
        if out.tracker_id is None:
            return []
        return [
            Track(int(tid), tuple(float(v) for v in box), float(conf) if conf is not None else 0.0)  # type: ignore[arg-type]
            for box, tid, conf in zip(
                out.xyxy,
                out.tracker_id,
                out.confidence if out.confidence is not None else [None] * len(out),
                strict=True,
            )
            if tid >= 0
        ]
