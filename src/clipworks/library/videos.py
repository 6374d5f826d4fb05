"""Videos in the library: each one sampled into moments (`clipworks.video.frames.Moments`), one vector each.

A video is streamed through the one decode -> batch -> encode pipeline (`clipworks.video.features`): frames
are decoded, thumbnailed for the shot-change measure, and only the sampled ones preprocessed, so memory holds
a batch of frames however long the video is; what grows with its length is its moments' vectors (2 KB each
for a 512-d model: 7 MB for two hours at one every 2 s). They are written with the video's row in one
transaction, so an index run killed mid-video leaves that video as it was, and the next run samples it
whole. A video that cannot be opened or decoded is recorded with its error (out of search, retried when it
changes) and the run goes on with the next file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from clipworks.display import one_line
from clipworks.errors import BadImage, UsageError
from clipworks.library.indexer import IndexReport, read_file_facts
from clipworks.library.metadata import UPDATE_METADATA
from clipworks.library.store import MOMENT_SLOTS, TEXT_ARG, ModelRow, Store, now, to_blob, to_bytes
from clipworks.runtime.encoder import ClipModel
from clipworks.video.frames import BadVideo, Moments, Sampling

DEFAULT_VIDEO_EVERY_S = 2.0
MIN_VIDEO_EVERY_S = 0.1  # ten moments a second is already more than any search needs


def check_video_every(seconds: float) -> None:
    if not seconds >= MIN_VIDEO_EVERY_S:  # NaN fails too
        raise UsageError(f"--video-every must be at least {MIN_VIDEO_EVERY_S} seconds, not {seconds}")


def sample_video(clip: ClipModel, path: str, every_s: float, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(times in seconds, unit vectors) of the moments of one video; `BadVideo` naming it when it cannot
    be read or holds no frame."""
    sampling = Sampling(None, 0.0, moments=Moments(every_s))
    from clipworks.video.features import iter_feature_batches

    times: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    for stamps, vectors in iter_feature_batches(clip, path, sampling, batch_size=batch_size, normalize=True):
        times.append(stamps / 1000)
        chunks.append(vectors)
        if sum(map(len, times)) >= MOMENT_SLOTS:
            raise BadVideo(f"{path} has more than {MOMENT_SLOTS} moments: index it with a larger --video-every")
    if not times:
        raise BadVideo(f"{path} holds no frame that decodes")
    return np.concatenate(times), np.concatenate(chunks).astype(np.float32, copy=False)


def embed_videos(
    store: Store,
    clip: ClipModel,
    model: ModelRow,
    todo: list[tuple[int, str]],
    report: IndexReport,
    *,
    every_s: float,
    batch_size: int = 32,
    progress: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Sample and embed each of ``todo`` (file id, path), one transaction per video."""
    from tqdm import tqdm

    if not todo:
        return
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=len(todo), unit="video", disable=disable, dynamic_ncols=True) as bar:
        for file_id, path in todo:
            facts = read_file_facts(path)
            try:
                times, vectors = sample_video(clip, path, every_s, batch_size=batch_size)
            except (BadVideo, BadImage) as e:
                with store.write() as db:
                    db.execute(
                        f"UPDATE files SET hash = ?, error = {TEXT_ARG}, updated_at = ? WHERE id = ?",
                        (facts.hash, to_bytes(str(e)), now(), file_id),
                    )
                report.failed += 1
                report.failures.append((path, str(e)))
                # Both errors name the file already.
                bar.write(f"warning: skipped {one_line(str(e))}", file=sys.stderr)
                bar.update(1)
                continue
            with store.write() as db:
                db.execute("DELETE FROM moments WHERE model_id = ? AND file_id = ?", (model.id, file_id))
                db.executemany(
                    "INSERT INTO moments (model_id, file_id, ordinal, time, vector) VALUES (?, ?, ?, ?, ?)",
                    [
                        (model.id, file_id, n, float(t), to_blob(v))
                        for n, (t, v) in enumerate(zip(times, vectors, strict=True))
                    ],
                )
                db.execute(
                    "INSERT OR REPLACE INTO videos (model_id, file_id, every_s, moments) VALUES (?, ?, ?, ?)",
                    (model.id, file_id, every_s, len(times)),
                )
                db.execute(
                    "UPDATE files SET hash = ?, error = NULL, updated_at = ? WHERE id = ?", (facts.hash, now(), file_id)
                )
                db.execute(UPDATE_METADATA, (*facts.metadata.row(), file_id))
            report.embedded += 1
            report.moments += len(times)
            bar.update(1)
            if on_batch:
                on_batch(report.embedded)
