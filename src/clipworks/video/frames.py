"""Frame sampling with PyAV: every frame, or exactly the frames ffmpeg's ``fps=N`` filter keeps, streamed.

PyAV ships its own FFmpeg libraries, so no system ffmpeg and no re-encode are needed. Frames are yielded
one at a time (a generator, as supervision's ``get_video_frames_generator``), so memory does not grow
with the length of the video.

ffmpeg's ``fps`` filter (default ``round=near``, no ``start_time``) works on a grid of output slots
``t / N`` seconds: the first slot is the first frame's time rounded to the grid, slot ``t`` shows the
last input frame whose rounded time is at most ``t`` (so frames are dropped, or repeated when ``N`` is
above the source rate), and slots continue until the stream's end time rounded to the grid. Times are
relative to the file's start time, as the ffmpeg command line makes them.

`Moments` is the library's sampling: a frame every N seconds plus the first frame of each shot, found in
the same single pass over the decoded frames (see `CUT_THRESHOLD`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.errors import ClipworksError, UsageError

# Containers the library walks as videos (PyAV opens them all; a file that is no video fails naming itself).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".3gp", ".mts", ".m2ts", ".ogv"}
)

# A shot change is a frame whose colour histogram differs from the previous frame's by at least CUT_THRESHOLD
# in total variation (half the L1 distance of the normalised histograms, 0 same colours to 1 disjoint),
# measured on a CUT_SIDE x CUT_SIDE thumbnail with CUT_BINS levels per RGB channel, averaged over channels.
# Motion and noise in one shot move a few bins (0.05-0.2 on real footage); a hard cut between scenes moves
# most of the mass. Gradual fades never cross it: they are no hard cut, and the regular samples cover them.
CUT_THRESHOLD = 0.4
CUT_SIDE = 32
CUT_BINS = 16
# A flash or a strobe changes every frame: at most one shot-change moment per this many seconds (a regular
# moment just before a cut still shows the shot before it, so it does not count).
MIN_CUT_GAP_S = 0.5


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


class BadVideo(ClipworksError):
    """A video that is missing, unreadable, or has no video stream."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float  # what OpenCV's CAP_PROP_FPS reports: see opencv_fps
    num_frames: int  # the container's frame count, else estimated from the duration
    duration: float  # seconds
    width: int
    height: int
    created: str | None = None  # the container's creation_time tag (ISO 8601, UTC), when it has one


@dataclass(frozen=True)
class Moments:
    """A frame every ``every_s`` seconds (the first one at or after each multiple) and, with
    ``cut_threshold``, the first frame of each new shot (see `CUT_THRESHOLD`)."""

    every_s: float
    cut_threshold: float | None = CUT_THRESHOLD


@dataclass(frozen=True)
class Sampling:
    """Which frames to take: ``rate`` None means every frame; ``fps`` is the value saved as ``fps``.

    Frame ``i``'s timestamp is ``i / fps * 1000`` ms, video_features' arithmetic; ``presentation_times``
    gives every-frame sampling each frame's own presentation time instead (they differ on
    variable-frame-rate files).
    """

    rate: Fraction | None
    fps: float
    limit: int | None = None
    presentation_times: bool = False
    moments: Moments | None = None  # the library's sampling instead (times are presentation times)

    def expected_frames(self, info: VideoInfo) -> int:
        count = info.num_frames if self.rate is None else round(info.duration * float(self.rate))
        return min(count, self.limit) if self.limit is not None else count


@dataclass
class SampledFrame:
    index: int
    timestamp_ms: float
    frame: Any  # av.VideoFrame; the same one repeats when the rate is above the source's

    def to_rgb(self) -> np.ndarray:
        """HxWx3 uint8 RGB, converted by swscale as ``ffmpeg -pix_fmt rgb24`` does."""
        return self.frame.to_ndarray(format="rgb24")

    def to_image(self) -> Any:
        return self.frame.to_image()


def _open(path: Path) -> Any:
    import av

    if not path.is_file():
        raise BadVideo(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise BadVideo(f"{path} cannot be read as a video ({_one_line(e)})") from e
    if not container.streams.video:
        container.close()
        raise BadVideo(f"{path} has no video stream")
    return container


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def opencv_fps(stream: Any) -> Fraction:
    """The frame rate OpenCV's ``CAP_PROP_FPS`` reports, which video_features saves and divides by.

    OpenCV's FFmpeg backend (``CvCapture_FFMPEG::get_fps`` in ``cap_ffmpeg_impl.hpp``; its
    ``av_guess_frame_rate`` branch is compiled out) takes the stream's ``avg_frame_rate``, else one over
    the time base. On a variable-frame-rate file that is the mean rate, not ``av_guess_frame_rate``'s
    ``r_frame_rate``.
    """
    if stream.average_rate:
        return Fraction(stream.average_rate)
    return 1 / Fraction(stream.time_base)


def probe(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and duration from the container, without decoding."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = opencv_fps(stream)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        frames = stream.frames or round(duration * float(rate))
        ctx = stream.codec_context
        created = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
        return VideoInfo(path, float(rate), int(frames), duration, ctx.width, ctx.height, created)


def plan_sampling(
    info: VideoInfo, extraction_fps: float | None = None, extraction_total: int | None = None
) -> Sampling:
    """video_features' rules: a fixed rate, or ``total`` frames spread evenly, or every frame."""
    if extraction_fps is not None and extraction_total is not None:
        raise UsageError("--extraction-fps and --extraction-total are mutually exclusive: give one of them")
    if extraction_fps is not None:
        if not extraction_fps > 0:
            raise UsageError(f"--extraction-fps must be above 0, not {extraction_fps}")
        return Sampling(ffmpeg_rate(extraction_fps), float(extraction_fps))
    if extraction_total is not None:
        if extraction_total < 1:
            raise UsageError(f"--extraction-total must be at least 1, not {extraction_total}")
        if info.num_frames < 1:
            raise BadVideo(f"{info.path}: the frame count is unknown, so --extraction-total cannot spread frames")
        fps = extraction_total * info.fps / info.num_frames  # video_features: total * fps / frames
        return Sampling(ffmpeg_rate(fps), fps, extraction_total)
    return Sampling(None, info.fps)


def ffmpeg_rate(fps: float | str) -> Fraction:
    """The rational ffmpeg makes of ``fps=N`` (av_parse_video_rate: at most 1001000 as denominator)."""
    return Fraction(str(fps)).limit_denominator(1_001_000)


def _round_near(x: Fraction) -> int:
    """AV_ROUND_NEAR_INF: to nearest, halves away from zero."""
    return math.floor(x + Fraction(1, 2)) if x >= 0 else -math.floor(-x + Fraction(1, 2))


def iter_frames(path: str | Path, sampling: Sampling | None = None, *, threads: bool = True) -> Iterator[SampledFrame]:
    """Yield the sampled frames of ``path`` in order; a decoding failure raises ``BadVideo`` naming the file."""
    import av

    path = Path(path)
    sampling = sampling or Sampling(None, 0.0)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"  # frame threads: decoding keeps up with the encoder on more cores
        if sampling.moments is not None:
            source = _moments(container, stream, sampling.moments)
        elif sampling.rate is not None:
            source = _at_rate(container, stream, sampling)
        elif sampling.presentation_times:
            source = _every_frame_presented(container, stream)
        else:
            source = _every_frame(container, stream, sampling.fps)
        for frame in source:
            if sampling.limit is not None and frame.index >= sampling.limit:
                break
            yield frame
    except av.error.FFmpegError as e:
        raise BadVideo(f"{path}: decoding failed ({_one_line(e)})") from e
    finally:
        container.close()


def frame_at(path: str | Path, seconds: float) -> Any:
    """The frame shown ``seconds`` into the video (times as `iter_frames` gives them), as a PIL image: a
    seek to the key frame before it, then decoding up to it. Past the end, the last frame."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        start = _start(container)
        target = Fraction(seconds).limit_denominator(1_000_000) + start
        container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True)
        shown = None
        for frame in container.decode(stream):
            if shown is not None and frame.pts is not None and frame.pts * stream.time_base > target:
                break
            shown = frame
        if shown is None:
            raise BadVideo(f"{path} holds no frame at {seconds} s")
        return shown.to_image()
    except av.error.FFmpegError as e:
        raise BadVideo(f"{path}: decoding failed ({_one_line(e)})") from e
    finally:
        container.close()


def _start(container: Any) -> Fraction:
    # The ffmpeg command line shifts timestamps so that the file starts at 0 (no -copyts).
    return Fraction(container.start_time or 0, 1_000_000)


def _every_frame(container: Any, stream: Any, fps: float) -> Iterator[SampledFrame]:
    # video_features' VideoLoader (utils/io.py): the i-th frame OpenCV reads is at (i / CAP_PROP_FPS) * 1000.
    fps = fps or float(opencv_fps(stream))
    for i, frame in enumerate(container.decode(stream)):
        yield SampledFrame(i, i / fps * 1000, frame)


def _every_frame_presented(container: Any, stream: Any) -> Iterator[SampledFrame]:
    tb, start = stream.time_base, _start(container)
    step = 1 / Fraction(stream.guessed_rate or 25)
    last: Fraction | None = None
    for i, frame in enumerate(container.decode(stream)):
        t = frame.pts * tb - start if frame.pts is not None else (last + step if last is not None else Fraction(0))
        last = t
        yield SampledFrame(i, float(t * 1000), frame)


def colour_histogram(frame: Any) -> np.ndarray:
    """(3, CUT_BINS) fractions of a `CUT_SIDE` thumbnail's pixels per level of R, G and B (swscale shrinks it)."""
    small = frame.reformat(width=CUT_SIDE, height=CUT_SIDE, format="rgb24").to_ndarray().reshape(-1, 3)
    levels = (small // (256 // CUT_BINS)).astype(np.intp) + np.arange(3) * CUT_BINS
    return np.bincount(levels.ravel(), minlength=3 * CUT_BINS).reshape(3, CUT_BINS) / len(small)


def shot_change(before: np.ndarray, after: np.ndarray) -> float:
    """Total variation between two `colour_histogram`s, averaged over channels: 0 (same) to 1 (disjoint)."""
    return float(np.abs(before - after).sum() / (2 * len(before)))


def _moments(container: Any, stream: Any, policy: Moments) -> Iterator[SampledFrame]:
    """One pass over every decoded frame: a moment at each ``every_s`` slot and at each shot change."""
    index = 0
    next_slot = 0.0
    last_cut = -math.inf
    previous: np.ndarray | None = None
    for seen in _every_frame_presented(container, stream):
        t = seen.timestamp_ms / 1000
        cut = False
        if policy.cut_threshold is not None:
            histogram = colour_histogram(seen.frame)
            cut = previous is not None and shot_change(previous, histogram) >= policy.cut_threshold
            cut = cut and t - last_cut >= MIN_CUT_GAP_S
            previous = histogram
        regular = t >= next_slot - 1e-9  # a frame on the slot, give or take float rounding of its time
        if regular or cut:
            yield SampledFrame(index, seen.timestamp_ms, seen.frame)
            index += 1
            last_cut = t if cut else last_cut
        if regular:
            next_slot = (math.floor(t / policy.every_s + 1e-9) + 1) * policy.every_s


def _at_rate(container: Any, stream: Any, sampling: Sampling) -> Iterator[SampledFrame]:
    assert sampling.rate is not None
    rate, tb, start = sampling.rate, stream.time_base, _start(container)
    slot: int | None = None  # the next output slot, in units of 1 / rate
    held: Any = None  # the newest frame at or before the slot
    held_t = Fraction(0)
    index = 0
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        t = frame.pts * tb - start
        here = _round_near(t * rate)
        if slot is None:
            slot = here
        while held is not None and here > slot:
            yield SampledFrame(index, index / sampling.fps * 1000, held)
            index += 1
            slot += 1
        held, held_t = frame, t
    if held is None or slot is None:
        return
    stop = _round_near(_end_time(stream, held, held_t, start) * rate)
    while slot < stop:
        yield SampledFrame(index, index / sampling.fps * 1000, held)
        index += 1
        slot += 1


def _end_time(stream: Any, last: Any, last_t: Fraction, start: Fraction) -> Fraction:
    """When the stream ends: the last frame's time plus its duration, as ffmpeg sends EOF to the filter.

    The stream's declared end wins when it is earlier: it holds the last packet's duration as the file
    states it, which newer demuxers replace with a guess (an MP4 whose last sample lasts one tick).
    """
    tb = stream.time_base
    candidates = []
    if last.duration:
        candidates.append(last_t + last.duration * tb)
    if stream.duration:
        declared = ((stream.start_time or 0) + stream.duration) * tb - start
        if declared > last_t:
            candidates.append(declared)
    return min(candidates) if candidates else last_t + 1 / Fraction(stream.guessed_rate or 25)
