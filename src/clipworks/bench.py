"""``clipworks bench``: how fast a model runs here, how fast it could run, and how close the pipeline gets.

Three measurements on the user's own machine and photos:

- **model only**: latency and images/s per batch size on random pixels (a static graph: its one batch size,
  as Sophgo's ``bmrt_test`` reports a compiled model);
- **decode + preprocess**: milliseconds per photo on one core, on the user's photos;
- **end to end**: the real ``embed images`` pipeline over the same photos, wall time and CPU time per image.

From them comes the **ceiling**, whichever bound is lower. Every image costs ``decode_s`` of one core plus
the model's CPU time for it (``model_cpu_s``, all its threads), so ``cores`` cores finish at most
``cores / (decode_s + model_cpu_s)`` images a second (*cpu*-bound); and the model runs one batch at a time,
so never more than ``1 / model_s`` (*model*-bound, ``model_s`` its wall time per image). A model whose
threads keep every core busy makes the first bound ``1 / (decode_s / cores + model_s)``; one that leaves
cores idle (OpenVINO unpinned, a small batch) leaves room for decoding beside it, which this counts. The
end-to-end figure, over enough batches that filling the pipeline is a small part of it, is reported as a
share of the ceiling.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.machine import Machine, this_machine
from clipworks.runtime.encoder import ClipModel, PreprocessMode

DEFAULT_BATCH_SIZES = (1, 8, 16, 32)
SAMPLE_PHOTOS = Path(__file__).resolve().parent / "data" / "check_images"


@dataclass
class BatchTiming:
    batch: int
    latency_ms: float  # median time for one batch
    images_per_s: float


@dataclass
class BenchReport:
    machine: Machine
    model: str
    precision: str
    providers: list[str]
    threads: int
    mode: str
    model_only: list[BatchTiming]
    photos: int = 0
    decode_ms: float = 0.0  # per photo, one core, median over the photos
    ceiling_images_per_s: float = 0.0
    bound: str = ""
    end_to_end_images_per_s: float = 0.0
    end_to_end_cpu_ms: float = 0.0  # CPU seconds (all threads) per image
    # What one image costs when nothing is wasted: its decode on one core plus the model's CPU time for it
    # (measured on one batch, all threads); end_to_end_cpu_ms above this is spinning, waiting or overhead.
    model_cpu_ms: float = 0.0
    skipped: list[str] = field(default_factory=list)

    @property
    def share_of_ceiling(self) -> float:
        return self.end_to_end_images_per_s / self.ceiling_images_per_s if self.ceiling_images_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["machine"] = {**asdict(self.machine), "description": self.machine.describe()}
        data["share_of_ceiling"] = round(self.share_of_ceiling, 4)
        return data


def _repeat_timed(run: Callable[[], object], seconds: float, min_runs: int = 3) -> float:
    """Median seconds of ``run`` after one warm-up, repeated for about ``seconds`` (at least ``min_runs``)."""
    run()  # first run: ORT allocates its arena and picks kernels
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(model: ClipModel, batch_sizes: Sequence[int], seconds: float) -> list[BatchTiming]:
    """Model-only timings on random pixels; a graph with a static batch is timed at that batch only."""
    height, width = model.preprocess_cfg.size
    static = model.visual.static_batch
    rng = np.random.default_rng(0)
    timings = []
    for batch in [static] if static else batch_sizes:
        pixels = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
        latency = _repeat_timed(lambda pixels=pixels: model.embed_image_batch(pixels), seconds)
        timings.append(BatchTiming(batch, latency * 1000, batch / latency))
    return timings


def time_decode(model: ClipModel, photos: Sequence[Path], mode: PreprocessMode) -> tuple[float, list[str]]:
    """Median seconds to decode and preprocess one photo on this thread; unreadable photos are listed."""
    from clipworks.errors import BadImage

    times, skipped = [], []
    for photo in photos:
        try:
            model.preprocess(photo, mode)  # warm the file cache: bench decoding, not the disk
            start = time.perf_counter()
            model.preprocess(photo, mode)
            times.append(time.perf_counter() - start)
        except BadImage as e:
            skipped.append(f"{photo}: {e}")
    return (statistics.median(times) if times else 0.0), skipped


def model_cpu_seconds(model: ClipModel, batch: int) -> float:
    """CPU seconds (all threads) the model spends per image on one warm batch of random pixels."""
    height, width = model.preprocess_cfg.size
    pixels = np.random.default_rng(1).standard_normal((batch, 3, height, width), dtype=np.float32)
    model.embed_image_batch(pixels)
    cpu = _cpu_seconds()
    model.embed_image_batch(pixels)
    return (_cpu_seconds() - cpu) / batch


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_end_to_end(
    model: ClipModel, photos: Sequence[Path], images: int, batch_size: int, mode: PreprocessMode
) -> tuple[float, float]:
    """Images/s and CPU ms per image of the real pipeline over ``images`` photos (the folder, cycled)."""
    from clipworks.pipeline import embed_files

    sources = [photos[i % len(photos)] for i in range(images)]
    embed_files(model, sources[: min(len(sources), batch_size)], batch_size=batch_size, mode=mode, progress=False)
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = embed_files(model, sources, batch_size=batch_size, mode=mode, progress=False, on_skip=lambda _f: None)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    done = max(len(result.paths), 1)
    return done / wall, cpu / done * 1000


def photo_files(folder: Path | None) -> list[Path]:
    from clipworks.pipeline import collect_image_files

    return collect_image_files([folder or SAMPLE_PHOTOS])


def run_bench(
    model: ClipModel,
    *,
    photos: Sequence[Path],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seconds: float = 2.0,
    images: int = 64,
    pipeline_batch: int = 32,
) -> BenchReport:
    machine = this_machine()
    # Session options as the pipeline runs them (no spinning beside the decoders), so that the model-only,
    # ceiling and end-to-end figures all describe the one session end to end uses.
    model.share_cores_with_decoders()
    mode: PreprocessMode = model.preprocess_mode
    report = BenchReport(
        machine=machine,
        model=model.name,
        precision=model.precision,
        providers=model.providers,
        threads=model.threads or machine.cores,
        mode=mode,
        model_only=time_model(model, batch_sizes, seconds),
    )
    if not photos:
        return report
    decode_s, report.skipped = time_decode(model, photos, mode)
    report.photos, report.decode_ms = len(photos) - len(report.skipped), decode_s * 1000
    if not report.photos:
        return report
    # The pipeline's batch (or the nearest timed one) is what end to end runs at.
    timing = min(report.model_only, key=lambda t: abs(t.batch - pipeline_batch))
    report.model_cpu_ms = model_cpu_seconds(model, timing.batch) * 1000
    cpu_bound = report.threads / (decode_s + report.model_cpu_ms / 1000)
    report.ceiling_images_per_s = min(cpu_bound, timing.images_per_s)
    report.bound = "cpu" if cpu_bound < timing.images_per_s else "model"
    good = [p for p in photos if not any(s.startswith(f"{p}:") for s in report.skipped)]
    report.end_to_end_images_per_s, report.end_to_end_cpu_ms = time_end_to_end(model, good, images, timing.batch, mode)
    return report


def format_report(report: BenchReport) -> str:
    lines = [
        f"machine   {report.machine.describe()}",
        f"model     {report.model}  precision {report.precision}  provider {', '.join(report.providers)}  "
        f"threads {report.threads}",
        "",
        "model only (random pixels)",
        "   batch   latency      images/s",
    ]
    lines += [f"   {t.batch:5d}   {t.latency_ms:8.1f} ms  {t.images_per_s:9.1f}" for t in report.model_only]
    if report.photos:
        lines += [
            "",
            f"decode + preprocess ({report.mode})  {report.decode_ms:.1f} ms per photo on one core, "
            f"median of {report.photos} photos",
            f"ceiling   {report.ceiling_images_per_s:.1f} images/s  (the lower of {report.threads} cores / (decode + "
            f"model CPU time) and 1 / model time; {report.bound}-bound)",
            f"end to end  {report.end_to_end_images_per_s:.1f} images/s = {report.share_of_ceiling:.0%} of the "
            f"ceiling, {report.end_to_end_cpu_ms:.1f} CPU-ms per image (decode + model alone: "
            f"{report.decode_ms:.1f} + {report.model_cpu_ms:.1f} = {report.decode_ms + report.model_cpu_ms:.1f})",
        ]
    if not report.machine.has_int8_dot_product and report.precision == "int8":
        lines.append("note: this CPU has no VNNI or AMX, so int8 runs on AVX2 and gains less than it would there")
    lines += [f"skipped {s}" for s in report.skipped]
    return "\n".join(lines)
