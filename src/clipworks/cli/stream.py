"""``clipworks stream``: CLIP on live video, whole-frame or per tracked person, one or several streams."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli import access
from clipworks.cli.common import DeviceOpt, PrecisionOpt, PromptFileModelOpt, ThreadsOpt, info, load_model
from clipworks.errors import ClipworksError, UsageError
from clipworks.settings import default_model

MULTI_DEFAULT_INPUTS = 4
DEFAULT_PROMPT_FILE = "embeddings.json"


def stream(
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="Video file, camera (/dev/video0 or 0), rtsp/http URL, or 'demo'."),
    ] = None,
    model: PromptFileModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    detector: Annotated[str, typer.Option(help="none (whole frame), person (HOG), or a YOLO .onnx path.")] = "none",
    detection_threshold: Annotated[float, typer.Option(help="Minimum person detection score.")] = 0.5,
    json_path: Annotated[
        Path | None,
        typer.Option(
            help=f"Hailo-format prompt file, created if missing (default: a few prompts in memory, "
            f"saved to ./{DEFAULT_PROMPT_FILE} only from the web page's Save).",
            show_default=False,
        ),
    ] = None,
    disable_runtime_prompts: Annotated[
        bool, typer.Option(help="Only read --json-path; never load the text encoder (saves its memory).")
    ] = False,
    multi_stream: Annotated[bool, typer.Option(help="Several inputs (4x demo by default), person mode.")] = False,
    web: Annotated[
        str | None, typer.Option(help="Serve the live page with the prompt panel on HOST:PORT (or PORT: 127.0.0.1).")
    ] = None,
    api_key: access.ApiKeyOpt = None,
    api_key_file: access.ApiKeyFileOpt = None,
    allowed_host: access.AllowedHostOpt = None,
    output: Annotated[Path | None, typer.Option(help="Write the annotated video (.mp4).")] = None,
    events: Annotated[Path | None, typer.Option(help="Write one JSON line per classification.")] = None,
    show_fps: Annotated[bool, typer.Option(help="Print and draw FPS and per-stage milliseconds.")] = False,
    sync: Annotated[bool, typer.Option(help="Play files at their own frame rate (else as fast as possible).")] = False,
    loop: Annotated[bool, typer.Option(help="Restart files when they end.")] = False,
    classify_every: Annotated[float, typer.Option(help="Seconds between classifications of one track.")] = 1.0,
    max_crops: Annotated[int, typer.Option(help="Most person crops classified per frame.")] = 8,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many processed frames.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Run CLIP on live video, Hailo CLIP app style: headless events, an mp4, or a browser page."""
    from clipworks.prompts import PromptSet
    from clipworks.stream.app import StreamApp, StreamOptions
    from clipworks.stream.prompts import PromptState
    from clipworks.stream.sinks import EventsSink, VideoSink, check_output_file

    uris = list(inputs or [])
    if multi_stream:
        uris = uris or ["demo"] * MULTI_DEFAULT_INPUTS
        if detector == "none":
            detector = "person"
    uris = uris or ["demo"]
    if len(uris) > 1 and not multi_stream:
        raise UsageError("several --input values need --multi-stream")
    if not 0.0 <= detection_threshold <= 1.0:
        raise UsageError(f"--detection-threshold must be between 0 and 1, not {detection_threshold}")
    if classify_every <= 0 or max_crops < 1:
        raise UsageError("--classify-every must be above 0 and --max-crops at least 1")
    host_port = _parse_web(web) if web else None
    if host_port is None and (api_key or api_key_file or allowed_host):
        raise UsageError("--api-key, --api-key-file and --allowed-host guard the live page: give --web too")
    key = access.api_key(api_key, api_key_file) if host_port else None
    hosts = access.allowed_hosts(host_port[0], allowed_host) if host_port else ()
    if output is not None and output.suffix.lower() != ".mp4":
        raise UsageError(f"--output {output}: write an .mp4 file")
    for path, flag in ((output, "--output"), (events, "--events")):
        if path is not None:
            check_output_file(path, flag)  # before the model loads and the first frame, not after the run
    _require_extras(detector, multi_stream, output is not None, web is not None)
    from clipworks.stream.sources import open_sources

    sources = open_sources(uris, sync=sync, loop=loop, strict=not multi_stream)
    if all(s.error for s in sources):
        raise ClipworksError("; ".join(s.error or "" for s in sources))
    if model is None:
        # Image embeddings must match the prompt file's: Hailo's files are RN50x4 (640-d), not the default.
        made_for = PromptSet.load(json_path).made_for() if json_path is not None and json_path.is_file() else None
        model = made_for or default_model()
    clip = load_model(model, device, precision, threads)
    encode = None
    if not disable_runtime_prompts:
        # Online prompts load the text tower now, as Hailo's app does, so the first edit is quick.
        clip.load_towers("textual")
        encode = clip.encode_texts
    prompts = PromptState.open(json_path or Path(DEFAULT_PROMPT_FILE), encode, create=json_path is not None)
    where = json_path if json_path is not None else "in memory"
    info(f"stream: {len(sources)} input(s), model {clip.name}, prompts {where} "
         f"({'online' if prompts.online else 'read-only'}), detector {detector}")  # fmt: skip
    opts = StreamOptions(
        detector=detector, detection_threshold=detection_threshold, interval=classify_every, max_crops=max_crops,
        multi_stream=multi_stream, show_fps=show_fps, max_frames=max_frames, duration=duration,
        draw=output is not None or web is not None, keep_alive=web is not None,
    )  # fmt: skip
    events_sink = EventsSink(events) if events is not None else None
    video_sink = VideoSink(output, fps=sources[0].fps or 10.0) if output is not None else None
    server = None
    app = StreamApp(clip, prompts, sources, opts, events=events_sink, video=video_sink, changes=sys.stdout)
    try:
        if host_port is not None:
            from clipworks.stream.web import WebServer

            server = WebServer(app, *host_port, api_key=key, allowed_hosts=hosts).start()
            app.view = server.view
            info(f"stream: live page at {server.url}/ (Ctrl-C to stop)")
        summary = app.run()
    finally:
        if server is not None:
            server.stop()
        if events_sink is not None:
            events_sink.close()
        if video_sink is not None:
            video_sink.close()
    info(summary.line())
    if summary.errors and len(summary.errors) == len(sources):
        raise ClipworksError("; ".join(summary.errors.values()))
    sys.stderr.flush()


def _require_extras(detector: str, multi_stream: bool, output: bool, web: bool) -> None:
    """Every optional module the run will import, checked before any work (clipworks[stream] has them all)."""
    from clipworks.extras import require

    require("av", "stream", "clipworks stream")
    if multi_stream:  # before the detector: --multi-stream picks person mode itself
        require(("cv2", "trackers", "supervision"), "stream", "--multi-stream")
    if detector != "none":
        require(("cv2", "trackers", "supervision"), "stream", f"--detector {detector}")
    if output:
        require("cv2", "stream", "--output")
    if web:
        require(("fastapi", "uvicorn", "cv2"), "stream", "--web")


def _parse_web(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"  # "[::1]:8080" -> "::1"; "8080" or ":8080" -> loopback
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--web {value}: give HOST:PORT (or PORT), for example 127.0.0.1:8080")
    return host, int(port)
