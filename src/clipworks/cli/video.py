"""``clipworks video features|search``: video_features' CLIP extractor, and search inside videos."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, ThreadsOpt, greedy_list_command, info, load_model
from clipworks.display import one_line, quote_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.extras import require

app = typer.Typer(help="Per-frame CLIP features (video_features-compatible) and search inside videos.",
                  no_args_is_help=True)  # fmt: skip

# video_features takes lists after one flag (`--pred-texts "a dog smiles" "a woman is lifting"`).
GreedyListCommand = greedy_list_command("--pred-texts", "--video-paths")


VIDEO_MODEL_DEFAULT = "ViT-B/32"


@app.command(cls=GreedyListCommand)
def features(
    videos: Annotated[list[Path] | None, typer.Argument(help="Video files.", show_default=False)] = None,
    video_paths: Annotated[
        list[Path] | None, typer.Option("--video-paths", help="More videos (one or more after the flag).")
    ] = None,
    file_with_video_paths: Annotated[
        Path | None, typer.Option("--file-with-video-paths", help="A text file with one video path a line.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            envvar="CLIPWORKS_MODEL",
            help="ViT-B/32, RN50, ..., a registry name, a bundle path, or custom.",
        ),
    ] = VIDEO_MODEL_DEFAULT,
    extraction_fps: Annotated[
        float | None, typer.Option("--extraction-fps", help="Frames per second to take (ffmpeg's fps=N frames).")
    ] = None,
    extraction_total: Annotated[
        int | None, typer.Option("--extraction-total", help="Frames to take, evenly spread over the video.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Frames per inference call (32 is much faster than 1).")] = 1,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    on_extraction: Annotated[
        str | None,
        typer.Option("--on-extraction", help="print, save_numpy or save_pickle (default print).", show_default=False),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option("--format", help="parquet: save one <stem>.parquet per video, one row per frame."),
    ] = None,
    output_path: Annotated[Path, typer.Option("--output-path", help="Root of the saved features.")] = Path("./output"),
    tmp_path: Annotated[Path, typer.Option("--tmp-path", help="Where --reencode puts its files.")] = Path("./tmp"),
    keep_tmp_files: Annotated[bool, typer.Option("--keep-tmp-files", help="Keep --reencode's files.")] = False,
    reencode: Annotated[
        bool, typer.Option("--reencode", help="Re-encode with system ffmpeg first, as video_features does.")
    ] = False,
    show_pred: Annotated[bool, typer.Option("--show-pred", help="Print the top-5 prompts of every frame.")] = False,
    pred_texts: Annotated[
        list[str] | None,
        typer.Option("--pred-texts", help="Prompts for --show-pred (default: the 400 Kinetics classes)."),
    ] = None,
    presentation_times: Annotated[
        bool,
        typer.Option(
            "--presentation-times",
            help="Every-frame timestamps_ms from each frame's PTS (video_features: frame index / fps).",
        ),
    ] = False,
) -> None:
    """Extract per-frame CLIP features exactly as video_features (feature_type=clip) saves them."""
    from clipworks.video.batch import ExtractionOptions, read_video_list, run_extraction
    from clipworks.video.models import output_name, resolve_model
    from clipworks.video.outputs import output_dir

    require("av", "video", "clipworks video")
    action = on_extraction or "print"
    if output_format is not None:
        if output_format != "parquet":
            raise UsageError(f"--format must be parquet (npy and pkl are --on-extraction save_numpy|save_pickle), "
                             f"not {output_format!r}")  # fmt: skip
        if on_extraction not in (None, "save_parquet"):
            raise UsageError(f"--format parquet saves Parquet files; it cannot go with --on-extraction {on_extraction}")
        action = "save_parquet"
    paths = read_video_list([*(videos or []), *(video_paths or [])], file_with_video_paths)
    name = output_name(model)
    opts = ExtractionOptions(
        output_dir=output_dir(output_path, name), on_extraction=action, extraction_fps=extraction_fps,
        extraction_total=extraction_total, batch_size=batch_size, tmp_dir=output_dir(tmp_path, name),
        keep_tmp_files=keep_tmp_files, reencode=reencode, pred_texts=pred_texts, show_pred=show_pred,
        presentation_times=presentation_times,
    )  # fmt: skip
    opts.check()
    clip = load_model(resolve_model(model), device, precision, threads)
    info(f"{clip.name}: {len(paths)} videos, {clip.precision} on {clip.providers[0]}, batch {batch_size}")
    if clip.bundle.meta.normalized:
        # video_features saves open_clip's raw encode_image (norm ~10 for ViT-B/32); Immich's graphs normalise
        # inside, so the raw output is gone: say so rather than save files that silently differ.
        info(
            f"warning: {clip.name}'s graph L2-normalises its output (an Immich-layout bundle), so the saved "
            "features are unit vectors where video_features saves raw encode_image output (each video's "
            "<stem>_clip.json, or its Parquet metadata, says so); for raw features, use a bundle made by "
            "`clipworks export`"
        )
    summary = run_extraction(clip, paths, opts)
    info(summary.line())
    if summary.failed:
        raise ClipworksError(f"{len(summary.failed)} of {len(paths)} videos failed (see the errors above)")


@app.command(cls=GreedyListCommand)
def search(
    query: Annotated[str, typer.Argument(help="What to look for, e.g. 'a person riding a bike'.")],
    videos: Annotated[list[Path], typer.Argument(help="Video files.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Moments to show.")] = 10,
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", envvar="CLIPWORKS_MODEL", help="The model the features were (or will be) made with."
        ),
    ] = VIDEO_MODEL_DEFAULT,
    extraction_fps: Annotated[
        float, typer.Option("--extraction-fps", help="Frames per second to embed where no features are saved.")
    ] = 1.0,
    output_path: Annotated[
        Path, typer.Option("--output-path", help="Where `video features` saved features (reused when present).")
    ] = Path("./output"),
    min_gap: Annotated[float, typer.Option(help="Seconds between two moments of the same video.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Frames per inference call.")] = 32,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Print the moments of the videos that best match a text: video, time and score, best first."""
    from clipworks.video.batch import read_video_list
    from clipworks.video.features import extract_features
    from clipworks.video.frames import plan_sampling, probe
    from clipworks.video.models import output_name, resolve_model
    from clipworks.video.outputs import load_features, output_dir
    from clipworks.video.search import top_moments

    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {top_k}")
    require("av", "video", "clipworks video")
    paths = read_video_list(videos, None)
    saved_dir = output_dir(output_path, output_name(model))
    clip = load_model(resolve_model(model), device, precision, threads)
    found = []
    for video in paths:
        features = load_features(saved_dir, video)
        if features is not None:
            info(f"{quote_path(video)}: using the {len(features.embeddings)} saved frames in {saved_dir}")
        else:
            try:
                features = extract_features(
                    clip, video, plan_sampling(probe(video), extraction_fps), batch_size=batch_size
                )
            except ClipworksError as e:
                print(f"error: {one_line(str(e))} - continuing with the next video", file=sys.stderr)
                continue
            shortfall = features.shortfall()
            if shortfall is not None:
                print(f"warning: {one_line(shortfall)}", file=sys.stderr)
            info(f"{quote_path(video)}: {len(features.embeddings)} frames at {extraction_fps:g} fps "
                 f"({features.frames_per_s:.1f} frames/s)")  # fmt: skip
        found.append(features)
    if not found:
        raise ClipworksError("none of the videos could be read")
    moments = top_moments(clip.encode_texts([query])[0], found, top_k=top_k, min_gap_ms=min_gap * 1000)
    for moment in moments:
        print(f"{moment.score:.4f}  {moment.clock}  {quote_path(moment.video)}")
