"""Decode + preprocess per image on one core, each candidate decoder on the same files (CPU time, so other
agents' load inflates it less than wall time would).

JPEG: Pillow full size ("exact"), Pillow's ``draft()`` (libjpeg's DCT scaling inside Pillow), simplejpeg's
``min_width/min_height`` (libjpeg-turbo's DCT scaling; with and without ``fastdct``/``fastupsample``) and
OpenCV's ``IMREAD_REDUCED_COLOR_{2,4,8}``. PNG and WebP: Pillow against OpenCV. Every candidate ends in the
same ``preprocess`` (resize, crop, normalise), so the figures compare what "fast" would cost with each.

    python benchmarks/bench_decode.py [--side 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

import common
from clipworks.imaging import PreprocessConfig, decode, preprocess


def candidates(cfg: PreprocessConfig) -> dict[str, dict[str, Callable[[Path], np.ndarray]]]:
    import cv2
    import simplejpeg

    cv2.setNumThreads(1)
    side = max(cfg.size)

    def simple(path: Path, fast: bool = False) -> np.ndarray:
        rgb = simplejpeg.decode_jpeg(path.read_bytes(), "RGB", fastdct=fast, fastupsample=fast,
                                     min_height=side, min_width=side)  # fmt: skip
        return preprocess(Image.fromarray(rgb), cfg)

    def opencv(path: Path, reduce: bool) -> np.ndarray:
        factor = 1
        if reduce:
            width, height = Image.open(path).size
            while factor < 8 and min(width, height) // (factor * 2) >= side:
                factor *= 2
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[factor]  # fmt: skip
        bgr = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
        return preprocess(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])), cfg)

    exact = {"pillow (exact)": lambda p: decode(p, cfg, "exact"), "clipworks fast": lambda p: decode(p, cfg, "fast")}
    return {
        "JPEG": {
            **exact,
            "pillow draft": lambda p: preprocess(_drafted(p, side), cfg),
            "simplejpeg": simple,
            "simplejpeg fastdct": lambda p: simple(p, True),
            "opencv reduced": lambda p: opencv(p, True),
        },
        "PNG": {**exact, "opencv": lambda p: opencv(p, False)},
        "WEBP": {**exact, "opencv": lambda p: opencv(p, False)},
    }


def _drafted(path: Path, side: int) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (side, side))
        return im.convert("RGB")


def cpu_ms(run: Callable[[Path], object], files: list[Path], reps: int = 2) -> float:
    for f in files:
        run(f)  # page cache and first-call costs out of the figure
    times = []
    for _ in range(reps):
        for f in files:
            start = time.process_time()
            run(f)
            times.append(time.process_time() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256, help="the model's input side (ViT-B-32-256: 256)")
    args = parser.parse_args()
    import os

    cfg = PreprocessConfig(size=(args.side, args.side))
    groups: dict[tuple[str, tuple[int, int]], list[Path]] = {}
    for path in common.mixed_photo_set(200):
        with Image.open(path) as im:
            groups.setdefault((im.format or "", im.size), []).append(path)
    print(f"{common.machine()}\nload {os.getloadavg()}; CPU-ms per image, median, decode + preprocess to {args.side}")
    table = candidates(cfg)
    for (fmt, size), files in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1][0])):
        cells = [f"{name} {cpu_ms(run, files[:6]):.1f}" for name, run in table[fmt].items()]
        print(f"{fmt:4s} {size[0]}x{size[1]:<5d} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
