"""Frame sampling against Debian's ffmpeg: the same frames as ``-vf fps=N``, pixel for pixel."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from clipworks.errors import UsageError
from clipworks.video.frames import BadVideo, Sampling, iter_frames, plan_sampling, probe

FFMPEG = shutil.which("ffmpeg")


def ffmpeg_frames(video: Path, fps: str | None, width: int, height: int):
    """Stream ``ffmpeg -i V [-vf fps=N] -f rawvideo -pix_fmt rgb24 -`` one frame at a time."""
    assert FFMPEG, "these tests compare with Debian's ffmpeg: apt-get install -y ffmpeg (.ci/run does)"
    vf = ["-vf", f"fps={fps}"] if fps else []
    cmd = [FFMPEG, "-v", "error", "-i", str(video), *vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    size = width * height * 3
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(size):
            assert len(chunk) == size
            yield np.frombuffer(chunk, np.uint8).reshape(height, width, 3)
    assert proc.returncode == 0


def test_ffmpeg_is_installed() -> None:
    assert FFMPEG, "ffmpeg is missing: apt-get update && apt-get install -y ffmpeg (.ci/run does it first)"


@pytest.mark.parametrize(
    ("name", "fps"),
    [
        ("v_GGSY1Qvo990.mp4", None),  # every frame, 19.62 fps source
        ("v_GGSY1Qvo990.mp4", "1"),
        ("v_GGSY1Qvo990.mp4", "40"),  # above the source rate: frames repeat; its last sample lasts one tick
        ("v_ZNVhz7ctTq0.mp4", "0.5"),
        ("v_ZNVhz7ctTq0.mp4", "7.3"),
        ("vtest.avi", "2"),  # MPEG-4 part 2 in AVI, 10 fps
    ],
)
def test_frames_match_ffmpeg_fps_filter(test_data: Path, name: str, fps: str | None) -> None:
    video = test_data / "videos" / name
    info = probe(video)
    sampling = plan_sampling(info, float(fps) if fps else None)
    ours = iter_frames(video, sampling)
    count = 0
    for ref in ffmpeg_frames(video, fps, info.width, info.height):
        frame = next(ours, None)
        assert frame is not None, f"ffmpeg kept more than our {count} frames"
        assert frame.index == count
        diff = np.abs(frame.to_rgb().astype(np.int16) - ref.astype(np.int16)).mean()
        assert diff < 1.0, f"frame {count}: mean absolute difference {diff:.3f} grey levels"
        count += 1
    assert next(ours, None) is None, f"we kept more frames than ffmpeg's {count}"
    assert count > 0


def test_timestamps_every_frame_on_a_constant_rate_file(test_data: Path) -> None:
    video = test_data / "videos" / "v_GGSY1Qvo990.mp4"  # time base 1/981, a frame every 50 ticks
    info = probe(video)
    stamps = [f.timestamp_ms for f in iter_frames(video, plan_sampling(info))]
    assert stamps == [i / info.fps * 1000 for i in range(355)]
    presented = [f.timestamp_ms for f in iter_frames(video, Sampling(None, info.fps, presentation_times=True))]
    np.testing.assert_allclose(presented, np.arange(355) * 50 / 981 * 1000)  # the same instants on such a file


# Frame times in ms: bursts at 30 fps with gaps, as a phone or screen recording writes them.
VFR_PTS_MS = (0, 33, 66, 200, 233, 500, 533, 566, 900, 1000, 1033, 1400)


@pytest.fixture(scope="module", params=["mp4", "mkv"])
def vfr_clip(request, tmp_path_factory) -> Path:
    """A variable-frame-rate H.264 clip, each frame written with its own pts (time base 1/1000)."""
    import av

    path = tmp_path_factory.mktemp("vfr") / f"vfr.{request.param}"
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = tb
        for i, pts in enumerate(VFR_PTS_MS):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, tb
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def video_features_native_rate(video: Path) -> tuple[float, list[float], list[float]]:
    """What video_features computes without --extraction-fps, run on OpenCV itself.

    v-iashin/video_features, utils/io.py ``VideoLoader``: ``fps = cap.get(cv2.CAP_PROP_FPS)`` in
    ``_get_video_prop``, and each frame ``cap.read()`` returns gets ``(current_idx - 1) / self.fps * 1000``
    in ``__next__``; models/_base/base_framewise_extractor.py saves ``np.array(video.fps)`` and those times.
    Also returns OpenCV's CAP_PROP_POS_MSEC per frame: the presentation times.
    """
    import cv2

    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS)
    stamps, presented = [], []
    current_idx = 0
    while True:
        frame_exists, _ = cap.read()
        current_idx += 1
        if not frame_exists:
            break
        stamps.append((current_idx - 1) / fps * 1000)
        presented.append(cap.get(cv2.CAP_PROP_POS_MSEC))
    cap.release()
    return fps, stamps, presented


def test_variable_frame_rate_fps_and_timestamps_are_video_features_own(vfr_clip: Path) -> None:
    fps, stamps, presented = video_features_native_rate(vfr_clip)
    assert len(stamps) == len(VFR_PTS_MS)
    info = probe(vfr_clip)
    sampling = plan_sampling(info)
    assert sampling.fps == info.fps == fps  # exactly, as a float
    assert [f.timestamp_ms for f in iter_frames(vfr_clip, sampling)] == stamps
    # The file is really variable-rate: index / fps is not when the frames are shown.
    assert not np.allclose(stamps, VFR_PTS_MS, atol=1)
    ours = [f.timestamp_ms for f in iter_frames(vfr_clip, Sampling(None, info.fps, presentation_times=True))]
    np.testing.assert_allclose(ours, presented, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours, VFR_PTS_MS, rtol=0, atol=1e-9)


def test_timestamps_at_a_rate_are_index_over_fps(test_data: Path) -> None:
    video = test_data / "videos" / "v_ZNVhz7ctTq0.mp4"
    stamps = [f.timestamp_ms for f in iter_frames(video, plan_sampling(probe(video), 2))]
    assert stamps == [i / 2 * 1000 for i in range(28)]


def test_probe_reports_what_opencv_reports(test_data: Path) -> None:
    info = probe(test_data / "videos" / "v_GGSY1Qvo990.mp4")
    assert (info.fps, info.num_frames, info.width, info.height) == (19.62, 355, 320, 240)


def test_extraction_total_spreads_frames_like_video_features(test_data: Path) -> None:
    video = test_data / "videos" / "vtest.avi"
    info = probe(video)
    sampling = plan_sampling(info, extraction_total=10)
    assert sampling.fps == pytest.approx(10 * 10 / 795)  # total * fps / frames
    assert sampling.limit == 10
    frames = list(iter_frames(video, sampling))
    assert len(frames) == 10
    assert [f.timestamp_ms for f in frames] == [i / sampling.fps * 1000 for i in range(10)]


@pytest.mark.parametrize(
    ("fps", "total", "message"),
    [
        (1.0, 5, "mutually exclusive"),
        (0.0, None, "--extraction-fps must be above 0"),
        (None, 0, "--extraction-total must be at least 1"),
    ],
)
def test_bad_sampling_options(test_data: Path, fps, total, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_sampling(probe(test_data / "videos" / "vtest.avi"), fps, total)


def test_rate_is_parsed_as_ffmpeg_does() -> None:
    assert Sampling(Fraction(73, 10), 7.3).rate == plan_sampling(_fake_info(), 7.3).rate


def _fake_info():
    from clipworks.video.frames import VideoInfo

    return VideoInfo(Path("x.mp4"), 30.0, 300, 10.0, 64, 48)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.mp4", "does not exist"),
        (lambda d: _write(d / "corrupt.mp4", b"\x00\x00\x00\x18ftypmp42 not really a video"), "cannot be read"),
        (lambda d: _audio_only(d / "sound.m4a"), "has no video stream"),
    ],
)
def test_unreadable_videos_raise_bad_video_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(BadVideo, match=message) as caught:
        list(iter_frames(path))
    assert path.name in str(caught.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _audio_only(path: Path) -> Path:
    assert FFMPEG, "ffmpeg is missing: apt-get install -y ffmpeg"
    cmd = [FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2", str(path)]
    subprocess.run(cmd, check=True)
    return path


@pytest.mark.parametrize("presentation_times", [False, True])
def test_saved_fps_and_timestamps_of_a_variable_frame_rate_file(vit_bundle, vfr_clip, tmp_path, presentation_times):
    from clipworks.cli.main import main

    fps, stamps, presented = video_features_native_rate(vfr_clip)
    extra = ["--presentation-times"] if presentation_times else []
    code = main(["video", "features", str(vfr_clip), "--model", str(vit_bundle), "--on-extraction", "save_numpy",
                 "--output-path", str(tmp_path), "--batch-size", "4", *extra])  # fmt: skip
    assert code == 0
    folder = tmp_path / "clip" / vit_bundle.name
    assert float(np.load(folder / "vfr_fps.npy")) == fps
    saved = np.load(folder / "vfr_timestamps_ms.npy").tolist()
    if presentation_times:
        np.testing.assert_allclose(saved, presented, rtol=0, atol=1e-9)
    else:
        assert saved == stamps


def test_presentation_times_with_a_rate_is_refused(vit_bundle, vfr_clip, tmp_path, capsys) -> None:
    from clipworks.cli.main import main

    code = main(["video", "features", str(vfr_clip), "--model", str(vit_bundle), "--extraction-fps", "2",
                 "--presentation-times", "--output-path", str(tmp_path)])  # fmt: skip
    assert code != 0
    assert "--presentation-times is for every-frame extraction" in capsys.readouterr().err
