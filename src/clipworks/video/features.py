"""Per-frame CLIP features of one video, through ``clipworks.pipeline``: a decode thread feeds the encoder.

The decode thread demuxes, decodes and preprocesses (PyAV and PIL release the GIL) while the caller's
thread runs ONNX Runtime on full batches, so decoding overlaps inference and at most ``queue_size``
preprocessed frames are held, however long the video.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipworks.pipeline import iter_embeddings
from clipworks.runtime.encoder import ClipModel
from clipworks.video.frames import Sampling, iter_frames

FEATURE_KEY = "clip"  # video_features' feature_type, the prefix of every output key


@dataclass
class VideoFeatures:
    """What video_features returns for one video: raw embeddings, the fps and each frame's time."""

    path: Path
    embeddings: np.ndarray  # (T, D) float32: raw encode_image output, unless unit_vectors
    timestamps_ms: np.ndarray  # (T,) float64
    fps: float
    seconds: float = 0.0
    expected_frames: int | None = None  # what the container's header promises for this sampling
    unit_vectors: bool = False  # the model's graph normalises (Immich's layout): raw output is not to be had

    @property
    def frames_per_s(self) -> float:
        return len(self.embeddings) / self.seconds if self.seconds > 0 else 0.0

    def shortfall(self) -> str | None:
        """A warning when decoding ended well before the header's frame count (a cut-off or damaged file).

        The features of the frames that were read are still right, so this is a warning, not an error.
        One frame of slack: the header's duration and ffmpeg's rounding can differ by a frame.
        """
        read, expected = len(self.embeddings), self.expected_frames
        if expected is None or read >= expected - 1:
            return None
        return (f"{self.path}: read {read} of the {expected} frames its header promises; "
                "the file is probably truncated or damaged")  # fmt: skip

    def as_dict(self) -> dict[str, np.ndarray]:
        """The keys and dtypes video_features saves (it builds them with ``np.array`` of Python floats)."""
        return {
            FEATURE_KEY: self.embeddings.astype(np.float64),
            "fps": np.array(self.fps, dtype=np.float64),
            "timestamps_ms": np.asarray(self.timestamps_ms, dtype=np.float64),
        }


def iter_feature_batches(
    model: ClipModel,
    path: str | Path,
    sampling: Sampling | None = None,
    *,
    batch_size: int = 32,
    queue_size: int | None = None,
    cancel: threading.Event | None = None,
    normalize: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(timestamps_ms, raw embeddings)`` per encoded batch, in frame order (unit vectors with
    ``normalize``, as the library stores them).

    One decode thread (the pipeline's): it opens, reads and closes the video itself, since PyAV's frame
    threads already decode in parallel and frames must come in order. A frame that fails is an error for
    the whole video (``skip=()``): a missing row would shift every later feature against video_features'.
    """
    batches = iter_embeddings(
        model, iter_frames(path, sampling), batch_size=batch_size, workers=1,
        queue_size=queue_size or max(2 * batch_size, 8), decode=lambda frame: model.preprocess(frame.to_image()),
        key=lambda frame: frame.timestamp_ms, normalize=normalize, skip=(), cancel=cancel,
        name="clipworks-video",
    )  # fmt: skip
    for batch in batches:
        yield np.asarray(batch.keys, np.float64), batch.embeddings


def extract_features(
    model: ClipModel,
    path: str | Path,
    sampling: Sampling | None = None,
    *,
    batch_size: int = 32,
    queue_size: int | None = None,
    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> VideoFeatures:
    """Embed the sampled frames of one video. ``on_batch(timestamps_ms, embeddings)`` sees each batch."""
    from clipworks.video.frames import plan_sampling, probe

    start = time.perf_counter()
    info = probe(path)
    if sampling is None:
        sampling = plan_sampling(info)
    times: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    for stamps, embeddings in iter_feature_batches(model, path, sampling, batch_size=batch_size, queue_size=queue_size):
        times.append(stamps)
        chunks.append(embeddings)
        if on_batch:
            on_batch(stamps, embeddings)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.embed_dim), np.float32)
    stamps = np.concatenate(times).astype(np.float64) if times else np.zeros((0,), np.float64)
    return VideoFeatures(
        Path(path), embeddings, stamps, sampling.fps, time.perf_counter() - start, sampling.expected_frames(info),
        unit_vectors=model.bundle.meta.normalized,
    )  # fmt: skip
