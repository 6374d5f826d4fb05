"""Images/s end to end (decode + preprocess + encode) and short-prompt text encoding, side by side.

Baseline: open_clip + PyTorch fp32 written the way open_clip's README shows it (one image at a time),
plus a batched PyTorch loop for a fairer second reference. Same photos, same thread count, one run.

    python benchmarks/bench_embed.py --images 160 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import bundle, machine, photo_set

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "labels" / "imagenet1k.txt"


def torch_readme_images(arch: str, paths: list[Path], threads: int) -> float:
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.eval()
    start = time.perf_counter()
    for path in paths:
        image = preprocess(Image.open(path)).unsqueeze(0)
        with torch.no_grad():
            features = model.encode_image(image)
            features /= features.norm(dim=-1, keepdim=True)
    return len(paths) / (time.perf_counter() - start)


def torch_batched_images(arch: str, paths: list[Path], threads: int, batch: int = 32) -> float:
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.eval()
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths[i : i + batch]])
        with torch.no_grad():
            model.encode_image(pixels, normalize=True)
    return len(paths) / (time.perf_counter() - start)


def clipworks_images(root: Path, paths: list[Path], threads: int, precision: str, mode: str) -> float:
    import clipworks
    from clipworks.pipeline import embed_files

    model = clipworks.load(root, precision=precision, threads=threads, preprocess=mode)
    model.encode_images(paths[:2])  # session start-up is not throughput
    result = embed_files(model, paths, batch_size=32, workers=threads, progress=False)
    return result.images_per_s


def torch_texts(arch: str, prompts: list[str], threads: int, batch: int = 100) -> float:
    import open_clip
    import torch

    torch.set_num_threads(threads)
    model = open_clip.create_model(arch, pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            model.encode_text(tokenizer(prompts[i : i + batch]), normalize=True)
    return len(prompts) / (time.perf_counter() - start)


def clipworks_texts(root: Path, prompts: list[str], threads: int, precision: str, batch: int = 100) -> float:
    import clipworks

    model = clipworks.load(root, precision=precision, threads=threads)
    model.encode_texts(prompts[:4])
    start = time.perf_counter()
    model.encode_texts(prompts, batch_size=batch)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()

    from clipworks.models.bundle import DEFAULT_PRECISIONS

    root = bundle(args.arch, ",".join(DEFAULT_PRECISIONS))  # what a first-use export holds
    paths = photo_set(args.images)
    labels = [line.split(",")[0].strip() for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    prompts = [f"a photo of a {label}." for label in labels][: args.prompts]
    print(f"machine: {machine()}")
    print(f"model: {args.arch} (random weights), {len(paths)} JPEGs of 1600x1200, {args.threads} threads\n")

    rows: dict[str, float] = {}
    runs = [
        (
            "open_clip torch fp32, README loop (baseline)",
            lambda: torch_readme_images(args.arch, paths, args.threads),
        ),
        ("open_clip torch fp32, batch 32", lambda: torch_batched_images(args.arch, paths, args.threads)),
        # `embed images` as a user runs it: --precision auto (int8-static on VNNI/AMX), exact decode.
        ("clipworks defaults (auto, exact)", lambda: clipworks_images(root, paths, args.threads, "auto", "exact")),
        ("clipworks auto fast", lambda: clipworks_images(root, paths, args.threads, "auto", "fast")),
        ("clipworks fp32 exact", lambda: clipworks_images(root, paths, args.threads, "fp32", "exact")),
        ("clipworks fp32 fast", lambda: clipworks_images(root, paths, args.threads, "fp32", "fast")),
        ("clipworks int8 exact", lambda: clipworks_images(root, paths, args.threads, "int8", "exact")),
        ("clipworks int8 fast", lambda: clipworks_images(root, paths, args.threads, "int8", "fast")),
    ]
    print(f"{'images (decode + preprocess + encode)':48} {'images/s':>9} {'vs baseline':>12} {'vs batch 32':>12}")
    for name, fn in runs:
        rows[name] = fn()
        base, batched = rows[runs[0][0]], rows.get(runs[1][0])
        versus = f"{rows[name] / batched:11.2f}x" if batched else ""
        print(f"{name:48} {rows[name]:9.1f} {rows[name] / base:11.2f}x {versus}", flush=True)

    text_runs = [
        (
            "open_clip torch fp32, padded to 77 (baseline)",
            lambda: torch_texts(args.arch, prompts, args.threads),
        ),
        ("clipworks fp32, padded to longest", lambda: clipworks_texts(root, prompts, args.threads, "fp32")),
        ("clipworks int8, padded to longest", lambda: clipworks_texts(root, prompts, args.threads, "int8")),
    ]
    print(f"\n{'texts (' + str(len(prompts)) + ' ImageNet prompts, batch 100)':48} {'texts/s':>9} {'vs baseline':>12}")
    for name, fn in text_runs:
        rows[name] = fn()
        base = rows[text_runs[0][0]]
        print(f"{name:48} {rows[name]:9.1f} {rows[name] / base:11.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
