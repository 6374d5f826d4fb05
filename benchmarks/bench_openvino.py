"""Model-only speed of OpenVINO beside ONNX Runtime on the same ViT graphs: the candidate AMX backend.

The issue names OpenVINO (bf16 or int8 on AMX) as an optional backend where it measures faster. This times,
in interleaved rounds in one process, ORT's fp32 and today's dynamic int8 graph beside OpenVINO's CPU plugin
running the exported fp32 graph at f32 and at bf16, and the static int8 (QDQ) graph, which OpenVINO
reads as int8, with the rest of the graph at f32 (what ``--device openvino`` runs) or bf16. The OpenVINO
rows are clipworks' own sessions (``OpenVINOBackend.open_session``). Cosines to ORT's fp32 vectors are
measured on the shipped photos.

    pip install openvino && python benchmarks/bench_openvino.py --batch 32 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from bench_model import _unit, check_photos, interleaved_times
from clipworks.export.exporter import CHECK_IMAGES
from clipworks.export.precision import calibration_pixels, to_int8, to_int8_static
from clipworks.models.bundle import load_bundle
from clipworks.runtime.sessions import CpuBackend, OpenVINOBackend, OrtSession, RuntimeSettings
from common import WORK, bundle, machine

Runner = Callable[[np.ndarray], np.ndarray]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    root = bundle(args.arch, "fp32")
    exported = root / "visual" / "model.onnx"
    out = WORK / f"openvino-{args.arch}"
    dynamic, static = out / "int8-dynamic" / "model.onnx", out / "int8-static" / "model.onnx"
    cfg = load_bundle(root).preprocess_cfg
    if not dynamic.is_file():
        to_int8(exported, dynamic)
    if not static.is_file():  # of the exported graph: OpenVINO does not read ORT's fused contrib attention
        to_int8_static(exported, static, [calibration_pixels(sorted(CHECK_IMAGES.glob("*.jpg")), cfg, log=print)])

    settings = RuntimeSettings(threads=args.threads)
    ort = CpuBackend(settings)
    # clipworks' own OpenVINO sessions (``--device openvino``), as the engine runs them
    ov, ov_bf16_rest = OpenVINOBackend(settings), OpenVINOBackend(replace(settings, precision_hint="bf16"))
    runners: dict[str, Runner] = {
        "ORT fp32": OrtSession(exported, ort).run,
        "ORT int8 dynamic (today)": OrtSession(dynamic, ort).run,
        "ORT int8 static": OrtSession(static, ort).run,
        "OpenVINO fp32": ov.open_session(exported, "fp32").run,
        "OpenVINO bf16": ov.open_session(exported, "bf16").run,
        "OpenVINO int8 static (auto on AMX)": ov.open_session(static, "int8-static").run,
        "OpenVINO int8 static, rest bf16": ov_bf16_rest.open_session(static, "int8-static").run,
    }
    size = cfg["size"]
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, *size), dtype=np.float32)
    times = interleaved_times(runners, pixels, args.rounds)
    photos = check_photos(cfg)
    reference = _unit(runners["ORT fp32"](photos))
    import openvino

    print(f"{args.arch} image tower, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"machine: {machine()}; openvino {openvino.__version__}")
    today = statistics.median(times["ORT int8 dynamic (today)"])
    print(f"{'engine and graph':<36} {'ms/batch':>9} {'images/s':>9} {'vs today':>9} {'min cosine':>11}")
    for name, runs in times.items():
        median = statistics.median(runs)
        cosine = float(np.sum(reference * _unit(runners[name](photos)), axis=1).min())
        print(f"{name:<36} {median * 1e3:9.0f} {args.batch / median:9.1f} {today / median:8.2f}x {cosine:11.5f}")


if __name__ == "__main__":
    main()
