"""Many videos in one run, as video_features' ``main.py`` does: skip the done ones, isolate failures.

Inputs are checked before any work (duplicate file stems would overwrite each other's outputs); each
video then either is skipped (all outputs exist), extracted, or fails with its error printed while the
run goes on with the next one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from clipworks.display import one_line, quote_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.runtime.encoder import ClipModel
from clipworks.video.features import VideoFeatures, extract_features
from clipworks.video.frames import BadVideo, Sampling, plan_sampling, probe
from clipworks.video.outputs import ACTIONS, already_extracted, print_features, save_features


@dataclass
class ExtractionOptions:
    output_dir: Path
    on_extraction: str = "print"
    extraction_fps: float | None = None
    extraction_total: int | None = None
    batch_size: int = 1
    tmp_dir: Path = Path("tmp")
    keep_tmp_files: bool = False
    reencode: bool = False
    pred_texts: list[str] | None = None
    show_pred: bool = False
    presentation_times: bool = False  # every-frame timestamps from PTS instead of video_features' i / fps

    def check(self) -> None:
        if self.on_extraction not in ACTIONS:
            raise UsageError(f"--on-extraction must be one of {', '.join(ACTIONS)}, not {self.on_extraction!r}")
        if self.extraction_fps is not None and self.extraction_total is not None:
            raise UsageError("--extraction-fps and --extraction-total are mutually exclusive: give one of them")
        if self.presentation_times and (self.extraction_fps is not None or self.extraction_total is not None):
            raise UsageError(
                "--presentation-times is for every-frame extraction; frames taken at a rate are at i / rate "
                "seconds by construction (drop --extraction-fps/--extraction-total)"
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.output_dir.resolve() == self.tmp_dir.resolve():
            raise UsageError(f"--output-path and --tmp-path are the same folder ({self.output_dir}); use two")


@dataclass
class RunSummary:
    extracted: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    short: list[Path] = field(default_factory=list)  # extracted, but fewer frames than their headers promise
    frames: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{len(self.extracted)} videos extracted ({self.frames} frames, {rate:.1f} frames/s)"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.short:
            parts.append(f"{len(self.short)} cut short (see the warnings)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def read_video_list(videos: Sequence[str | Path], file_with_video_paths: str | Path | None) -> list[Path]:
    """Positional videos plus a file with one path a line (blank lines ignored), duplicates refused."""
    paths = [Path(v) for v in videos]
    if file_with_video_paths is not None:
        listing = Path(file_with_video_paths)
        if not listing.is_file():
            raise UsageError(f"--file-with-video-paths {listing} does not exist")
        paths += [Path(line.strip()) for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not paths:
        raise UsageError("no videos given: pass VIDEO paths, --video-paths or --file-with-video-paths")
    stems = Counter(p.stem for p in paths)
    clashes = sorted(s for s, n in stems.items() if n > 1)
    if clashes:
        named = "; ".join(", ".join(str(p) for p in paths if p.stem == s) for s in clashes)
        raise UsageError(
            f"videos share a file name ({named}): their outputs would overwrite each other, "
            "so nothing was extracted; rename them or run them separately"
        )
    return paths


def _reencode(video: Path, fps: float, tmp_dir: Path) -> Path:
    """video_features' way, on request: ``ffmpeg -filter:v fps=fps=N`` into ``tmp_dir``."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipworksError("--reencode needs ffmpeg on PATH (apt-get install ffmpeg); without it, leave it out")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tmp_dir / f"{video.stem}_new_fps.mp4"
    cmd = [
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "panic",
        "-y",
        "-i",
        str(video),
        "-filter:v",
        f"fps=fps={fps}",
        str(out),
    ]
    if subprocess.run(cmd, check=False).returncode != 0 or not out.is_file():
        raise BadVideo(f"{video}: ffmpeg could not re-encode it at {fps} fps")
    return out


def extract_one(
    model: ClipModel, video: Path, opts: ExtractionOptions, predictor: Any, out: IO[str], log: IO[str]
) -> VideoFeatures:
    from tqdm import tqdm

    info = probe(video)
    sampling = plan_sampling(info, opts.extraction_fps, opts.extraction_total)
    if opts.presentation_times:
        sampling = replace(sampling, presentation_times=True)
    source = video
    if opts.reencode and sampling.rate is not None:
        source = _reencode(video, sampling.fps, opts.tmp_dir)
        sampling = Sampling(None, sampling.fps, sampling.limit)

    bar = tqdm(
        total=sampling.expected_frames(info), unit="frame", desc=video.name, file=log, leave=False,
        disable=not log.isatty(), dynamic_ncols=True,
    )  # fmt: skip

    def on_batch(stamps: Any, embeddings: Any) -> None:
        bar.update(len(embeddings))
        if predictor is not None:
            out.write(predictor.format(embeddings))

    try:
        features = extract_features(model, source, sampling, batch_size=opts.batch_size, on_batch=on_batch)
    finally:
        bar.close()
        if source != video and not opts.keep_tmp_files:
            source.unlink(missing_ok=True)
    if source != video:  # the re-encoded file plays at the target rate: frame i is at i / fps
        features.timestamps_ms = np.arange(len(features.embeddings)) / sampling.fps * 1000
    features.path = video
    return features


def run_extraction(
    model: ClipModel,
    videos: Sequence[Path],
    opts: ExtractionOptions,
    *,
    out: IO[str] | None = None,
    log: IO[str] | None = None,
) -> RunSummary:
    """Extract every video in turn; print or save each one as soon as it is done."""
    out, log = out or sys.stdout, log or sys.stderr
    opts.check()
    predictor = None
    if opts.show_pred:
        from clipworks.video.predict import FramePredictor

        predictor = FramePredictor(model, opts.pred_texts)
        for text in predictor.too_long:
            print(f"warning: --pred-texts {text!r} is longer than the model's {model.bundle.context_length} tokens; "
                  "it is cut to fit (video_features refuses it)", file=log)  # fmt: skip
    summary = RunSummary()
    start = time.perf_counter()
    for n, video in enumerate(videos, 1):
        if already_extracted(opts.output_dir, video, opts.on_extraction):
            print(f"Features for {video} already exist in {opts.output_dir.absolute()}/ - skipping..", file=out)
            summary.skipped.append(video)
            continue
        try:
            features = extract_one(model, video, opts, predictor, out, log)
            if opts.on_extraction == "print":
                print_features(features, out)
            else:
                save_features(features, opts.output_dir, opts.on_extraction, warn=out)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one bad video must not end a run over thousands
            message = str(e) if isinstance(e, ClipworksError) else f"{type(e).__name__}: {e}"
            print(f"error: {quote_path(video)}: {one_line(message)} - continuing with the next video", file=log)
            summary.failed.append((video, message))
            continue
        summary.extracted.append(video)
        summary.frames += len(features.embeddings)
        shortfall = features.shortfall()
        if shortfall is not None:
            print(f"warning: {one_line(shortfall)}", file=log)
            summary.short.append(video)
        print(
            f"[{n}/{len(videos)}] {quote_path(video)}: {len(features.embeddings)} frames in {features.seconds:.1f} s "
            f"({features.frames_per_s:.1f} frames/s)",
            file=log,
        )
    summary.seconds = time.perf_counter() - start
    return summary
