"""``clipworks bench``: model-only speed per batch size, decode cost, the machine's ceiling, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import (
    MODEL_DEFAULT,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    ThreadsOpt,
    check_preprocess,
    info,
    load_model,
)
from clipworks.errors import UsageError


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes takes positive integers separated by commas (1,8,16,32), not {text!r}")
    return sizes


def bench(
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    photos: Annotated[
        Path | None,
        typer.Option(
            "--photos",
            help="A folder of your own photos for decode and end-to-end timing "
            "(default: the sample photos shipped with clipworks).",
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Model-only batch sizes.")] = "1,8,16,32",
    images: Annotated[
        int, typer.Option("--images", help="Images the end-to-end run embeds (photos cycled; 8 batches of 32).")
    ] = 256,
    seconds: Annotated[float, typer.Option("--seconds", help="Time spent on each model-only batch size.")] = 2.0,
    preprocess: Annotated[str, typer.Option(help="exact or fast decoding.")] = "exact",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure a model here: model-only latency and images/s per batch size, decode + preprocess per photo
    on one core, the ceiling those allow (cores / (decode + model CPU time), or 1 / model time), and the
    end-to-end pipeline as a share of it, with the CPU's features (AVX2, AVX-512, VNNI, AMX) and the provider used."""
    from clipworks.bench import format_report, photo_files, run_bench

    check_preprocess(preprocess)
    if images < 1 or seconds <= 0:
        raise UsageError("--images must be at least 1 and --seconds above 0")
    sizes = _batch_sizes(batch_sizes)
    if photos is not None and not photos.is_dir():
        raise UsageError(f"--photos {photos} is not a folder")
    files = photo_files(photos)  # an empty folder is refused there, naming it
    clip = load_model(model, device, precision, threads, preprocess)
    info(f"benchmarking {clip.name} ({clip.precision}) on {clip.providers[0]}: about {len(sizes) * seconds:.0f} s")
    report = run_bench(clip, photos=files, batch_sizes=sizes, seconds=seconds, images=images)
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
