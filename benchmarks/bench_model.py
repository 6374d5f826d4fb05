"""Model-only speed of the exported graph before and after the attention pass, fp32 and int8, side by side.

Five graphs of one tower, timed in interleaved rounds in one process (so a busy neighbour slows all of
them alike): the graph torch exports, the same graph with fused attention (``clipworks.export.optimize``),
today's dynamic int8 of each, and static int8 (QDQ) of the fused graph calibrated on the shipped photos.
Cosines to the exported fp32 graph are measured on the same photos, and so is how far each photo's vector moves
between being encoded alone and in one batch with the others (dynamic int8 takes one scale per batch).

    python benchmarks/bench_model.py --batch 32 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipworks.export.exporter import CHECK_IMAGES
from clipworks.export.optimize import fuse_attention
from clipworks.export.precision import calibration_pixels, to_int8, to_int8_static
from clipworks.models.bundle import load_bundle
from clipworks.runtime.sessions import CpuBackend, OrtSession, RuntimeSettings
from common import WORK, bundle, machine


def build_variants(root: Path, heads: int, out: Path) -> dict[str, Path]:
    exported = root / "visual" / "model.onnx"
    fused = out / "fused" / "model.onnx"
    variants = {
        "fp32 exported": exported,
        "fp32 fused": fused,
        "int8 dynamic, exported": out / "int8-exported" / "model.onnx",
        "int8 dynamic, fused": out / "int8-fused" / "model.onnx",
        "int8 static, fused": out / "int8-static-fused" / "model.onnx",
    }
    if not fused.is_file():
        print("fusing attention:", fuse_attention(exported, fused, heads).to_dict())
    for name, src in (("int8 dynamic, exported", exported), ("int8 dynamic, fused", fused)):
        if not variants[name].is_file():
            to_int8(src, variants[name])
    if not variants["int8 static, fused"].is_file():
        cfg = load_bundle(root).preprocess_cfg
        pixels = calibration_pixels(sorted(CHECK_IMAGES.glob("*.jpg")), cfg, log=print)
        to_int8_static(fused, variants["int8 static, fused"], [pixels])
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    root = bundle(args.arch, "fp32")
    config = json.loads((root / "config.json").read_text())
    vision = config["vision_cfg"]
    heads = vision["width"] // vision.get("head_width", 64)
    variants = build_variants(root, heads, WORK / f"model-graph-{args.arch}")
    backend = CpuBackend(RuntimeSettings(threads=args.threads))
    sessions = {name: OrtSession(path, backend) for name, path in variants.items()}
    size = load_bundle(root).preprocess_cfg["size"]
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, *size), dtype=np.float32)
    times = interleaved_times({name: s.run for name, s in sessions.items()}, pixels, args.rounds)
    photos = check_photos(load_bundle(root).preprocess_cfg)
    reference = _unit(sessions["fp32 exported"].run(photos))

    print(f"{args.arch} image tower, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"machine: {machine()}")
    base = {p: statistics.median(times[n]) for p, n in (("fp32", "fp32 exported"), ("int8", "int8 dynamic, exported"))}
    # "batch |diff|": how far a photo's vector moves between being encoded alone and with the others.
    print(f"{'graph':<24} {'ms/batch':>9} {'images/s':>9} {'vs today':>9} {'min cosine':>11} {'batch |diff|':>13}")
    for name, runs in times.items():
        median = statistics.median(runs)
        today = base["int8" if name.startswith("int8") else "fp32"]
        together = _unit(sessions[name].run(photos))
        alone = _unit(np.concatenate([sessions[name].run(photos[i : i + 1]) for i in range(len(photos))]))
        cosine = float(np.sum(reference * together, axis=1).min())
        moved = float(np.abs(together - alone).max())
        print(f"{name:<24} {median * 1e3:9.0f} {args.batch / median:9.1f} {today / median:8.2f}x {cosine:11.5f}"
              f" {moved:13.1e}")  # fmt: skip
    print(f"fused fp32 vs today's dynamic int8: {base['int8'] / statistics.median(times['fp32 fused']):.2f}x")


def interleaved_times(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]], pixels: np.ndarray, rounds: int
) -> dict[str, list[float]]:
    """Seconds per run of each runner on ``pixels``, in interleaved rounds so a busy neighbour slows all alike."""
    for run in runners.values():  # first runs allocate, compile and pick kernels
        run(pixels)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(pixels)
            times[name].append(time.perf_counter() - start)
    return times


def check_photos(preprocess_cfg: dict) -> np.ndarray:
    """The shipped check photos, preprocessed as the runtime does: what the cosines are measured on."""
    from clipworks.imaging import PreprocessConfig, load_image, preprocess

    cfg = PreprocessConfig.from_dict(preprocess_cfg)
    return np.stack([preprocess(load_image(p), cfg) for p in sorted(CHECK_IMAGES.glob("*.jpg"))])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
