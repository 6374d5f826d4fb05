"""Per-frame CLIP features, frames/s end to end, side by side with video_features' approach.

Reference (video_features, feature_type=clip, batch 32): at a fixed rate, ffmpeg re-encodes the video
with ``-filter:v fps=fps=N`` into a temporary MP4, OpenCV decodes it, and open_clip's PyTorch model
embeds batches of 32 after its PIL transform; at every frame there is no re-encode (as in
video_features). clipworks: PyAV decodes and selects the same frames in a thread while ONNX Runtime
encodes batches of 32. Same videos, same random ViT-B-32 weights, same thread count, one run.

    python benchmarks/bench_video.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import bundle, machine

VIDEOS = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "videos").glob("*.mp4"))


class Reference:
    """video_features' loop: optional ffmpeg re-encode, OpenCV decode, open_clip torch in batches of 32."""

    name = "video_features approach: ffmpeg + OpenCV + open_clip torch fp32"

    def __init__(self, arch: str, threads: int, batch: int = 32) -> None:
        import cv2
        import open_clip
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        torch.manual_seed(0)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        self.model.eval()
        self.batch = batch
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-video-"))

    def run(self, video: Path, fps: float | None) -> tuple[int, float]:
        import cv2
        import torch
        from PIL import Image

        start = time.perf_counter()
        path = video
        if fps is not None:  # video_features' reencode_video_with_diff_fps
            path = self.tmp / f"{video.stem}_new_fps.mp4"
            cmd = f"ffmpeg -hide_banner -loglevel panic -y -i {video} -filter:v fps=fps={fps} {path}"
            subprocess.run(cmd.split(), check=True)
        cap = cv2.VideoCapture(str(path))
        pixels: list = []
        feats: list = []
        while True:
            ok, bgr = cap.read()
            if ok:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                pixels.append(self.preprocess(Image.fromarray(rgb)).unsqueeze(0))
            if pixels and (len(pixels) == self.batch or not ok):
                with torch.no_grad():
                    feats.extend(self.model.encode_image(torch.cat(pixels)).tolist())
                pixels = []
            if not ok:
                break
        cap.release()
        if fps is not None:
            os.remove(path)
        return len(feats), time.perf_counter() - start


class Ours:
    def __init__(self, root: Path, threads: int, precision: str) -> None:
        import numpy as np

        import clipworks

        self.name = f"clipworks {precision}"
        self.model = clipworks.load(root, precision=precision, threads=threads)
        self.model.encode_images([np.zeros((224, 224, 3), np.uint8)])  # session start-up is not throughput

    def run(self, video: Path, fps: float | None) -> tuple[int, float]:
        from clipworks.video import extract_features, plan_sampling, probe

        start = time.perf_counter()
        features = extract_features(self.model, video, plan_sampling(probe(video), fps), batch_size=32)
        return len(features.embeddings), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()

    root = bundle(args.arch, "fp32,int8,int8-static")  # what a first-use export holds
    print(f"machine: {machine()}")
    print(f"model: {args.arch} (random weights), {args.threads} threads, batch 32")
    print(f"videos: {', '.join(v.name for v in VIDEOS)}\n")
    runners = [
        Reference(args.arch, args.threads),
        Ours(root, args.threads, "auto"),  # what `clipworks video` runs by default (int8-static on VNNI/AMX)
        Ours(root, args.threads, "fp32"),
        Ours(root, args.threads, "int8"),
    ]
    rows: dict[str, dict[str, float]] = {}
    for label, fps in (("--extraction-fps 1", 1.0), ("every frame", None)):
        # Interleaved per video, in a rotating order, so that load from other jobs falls on every runner alike.
        totals = {r.name: [0, 0.0] for r in runners}
        load = [os.getloadavg()[0]]
        for i, video in enumerate(VIDEOS):
            for runner in runners[i % 3 :] + runners[: i % 3]:
                frames, seconds = runner.run(video, fps)
                totals[runner.name][0] += frames
                totals[runner.name][1] += seconds
                load.append(os.getloadavg()[0])
        print(f"{label:66} {'frames':>6} {'frames/s':>9} {'vs ref':>7}")
        base = None
        for name, (frames, seconds) in totals.items():
            rate = frames / seconds
            base = base or rate
            rows[f"{label} | {name}"] = {"frames": frames, "seconds": seconds, "frames_per_s": rate}
            print(f"{name:66} {frames:6d} {rate:9.1f} {rate / base:6.2f}x")
        print(f"(1-minute load average during these runs: {min(load):.1f} to {max(load):.1f})\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
