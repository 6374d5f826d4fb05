"""Realtime stream speed on vtest.avi: whole-frame and person mode, per-stage times, the text-tower memory
that --disable-runtime-prompts saves, and a straightforward OpenCV read + open_clip PyTorch loop, in one run.

    .venv/bin/python benchmarks/bench_stream.py [--frames 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, bundle, machine

VIDEO = ROOT.parent / "shared" / "data" / "videos" / "vtest.avi"


def run_mode(path: Path, detector: str, frames: int, threads: int) -> dict:
    import clipworks
    from clipworks.prompts import PromptSet, encode_entries
    from clipworks.stream.app import StreamApp, StreamOptions
    from clipworks.stream.prompts import PromptState
    from clipworks.stream.sources import open_sources

    model = clipworks.load(path, precision="auto", threads=threads)  # int8-static on VNNI/AMX, as `stream` runs
    ps = PromptSet.from_texts(["a person walking", "a street", "a car"])
    encode_entries(ps, model.encode_texts)
    state = PromptState(ps, Path("/dev/null"), None)
    app = StreamApp(model, state, open_sources([str(VIDEO)]), StreamOptions(detector=detector, max_frames=frames))
    s = app.run()
    return {"fps": s.rounds / s.seconds, "ms": s.stage_ms, "classifications": s.classifications}


def baseline(frames: int, threads: int) -> float:
    """What a user would write: cv2.VideoCapture + open_clip's preprocess + model.encode_image, fp32 torch."""
    import cv2
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    cap = cv2.VideoCapture(str(VIDEO))
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        while n < frames:
            ok, bgr = cap.read()
            if not ok:
                break
            x = preprocess(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))[None]
            model.encode_image(x)
            n += 1
    return n / (time.perf_counter() - start)


def text_tower_mib(path: Path) -> float:
    # Resident memory now (VmRSS), not the peak: loading the visual graph peaks above the text tower's size.
    code = (
        "import re, sys, clipworks; m = clipworks.load(sys.argv[1], precision='int8', threads=1); m.visual\n"
        "if sys.argv[2] == '1': m.encode_texts(['a person'])\n"
        "print(int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)))"
    )
    peaks = [int(subprocess.run([sys.executable, "-c", code, str(path), flag], capture_output=True, text=True,
                                check=True).stdout.split()[-1]) for flag in ("0", "1")]  # fmt: skip
    return (peaks[1] - peaks[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = bundle("ViT-B-32", "fp32,int8,int8-static")
    print(f"machine: {machine()}")
    whole = run_mode(path, "none", args.frames, args.threads)
    print(f"whole-frame (auto precision): {whole['fps']:.1f} frames/s, stages ms {whole['ms']}")
    person = run_mode(path, "person", args.frames, args.threads)
    print(
        f"person (HOG + ByteTrack, auto precision): {person['fps']:.1f} frames/s, "
        f"{person['classifications']} crops classified,"
        f" stages ms {person['ms']}"
    )
    base = baseline(min(args.frames, 100), args.threads)
    print(
        f"baseline OpenCV + open_clip fp32 torch: {base:.1f} frames/s; clipworks whole-frame / baseline = "
        f"{whole['fps'] / base:.2f}x"
    )
    print(f"text tower peak RSS (saved by --disable-runtime-prompts): {text_tower_mib(path):.0f} MiB")
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
