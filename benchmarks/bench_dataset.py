"""Streaming embed of a large synthetic WebDataset: images/s and the peak memory of the whole run.

Target: 1M small images with a peak resident set under 2 GB. The dataset (WebDataset tars of small JPEGs with
captions, as img2dataset writes them) is generated once under .bench/ and reused; the run is
``clipworks embed dataset`` in a child process, whose peak RSS is the kernel's high-water mark of it
(``ru_maxrss`` of the finished child; this parent stays small and prints its own for comparison).

    python benchmarks/bench_dataset.py --count 1000000 --threads 16          # the target (a big machine)
    python benchmarks/bench_dataset.py --count 2000 --model PATH/tiny-bundle  # a quick check
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import ROOT, WORK, bundle, machine

TARGET_MB = 2048
POOL = 997  # distinct JPEGs, cycled (a prime, so tar boundaries do not line up with the cycle)


def jpeg_pool(size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(POOL):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def dataset(count: int, per_tar: int, size: int) -> str:
    """``count`` samples in tars of ``per_tar``: KEY.jpg, KEY.txt, KEY.json; made once. Returns the brace pattern."""
    folder = WORK / f"wds-{count}-{per_tar}-{size}px"
    tars = (count + per_tar - 1) // per_tar
    done = folder / "complete"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        pool = jpeg_pool(size)
        for t in range(tars):
            with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
                for i in range(t * per_tar, min(count, (t + 1) * per_tar)):
                    key = f"{i:09d}"
                    for ext, data in (("jpg", pool[i % POOL]), ("txt", f"synthetic image {i}".encode()),
                                      ("json", f'{{"key": "{key}"}}'.encode())):  # fmt: skip
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        done.write_text(str(count))
    return str(folder / f"{{00000..{tars - 1:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000, help="samples in the synthetic dataset")
    parser.add_argument("--per-tar", type=int, default=10_000, help="samples per input tar (img2dataset's default)")
    parser.add_argument("--size", type=int, default=64, help="side of each synthetic JPEG, pixels")
    parser.add_argument("--model", help="bundle folder or model name (default: ViT-B-32 with random weights, int8)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=100_000, help="samples per output shard")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--enable-text", action="store_true", help="also embed the captions")
    args = parser.parse_args()

    pattern = dataset(args.count, args.per_tar, args.size)
    model = args.model or str(bundle("ViT-B-32", "fp32,int8"))
    out = WORK / f"emb-{args.count}-{Path(model).name}"
    if out.exists():
        subprocess.run(["rm", "-rf", "--", str(out)], check=True)  # a fresh job, not a resumed one
    command = [sys.executable, "-m", "clipworks.cli.main", "embed", "dataset", pattern, "--output-folder", str(out),
               "-m", model, "--precision", args.precision, "--batch-size", str(args.batch_size),
               "--shard-size", str(args.shard_size)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.enable_text:
        command.append("--enable-text")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if proc.returncode != 0:
        sys.exit(f"embed dataset failed ({proc.returncode}):\n{proc.stderr}")

    import numpy as np

    rows = sum(np.load(f, mmap_mode="r").shape[0] for f in sorted((out / "img_emb").glob("*.npy")))
    print(machine())
    print(f"model {model} ({args.precision}), {args.count} images of {args.size}x{args.size} px in tars of "
          f"{args.per_tar}, batch {args.batch_size}, output shards of {args.shard_size}"
          f"{', with captions' if args.enable_text else ''}")  # fmt: skip
    print(f"embedded {rows} rows in {seconds:.1f} s ({rows / seconds:.1f} images/s, model load included)")
    verdict = "meets" if child_peak_mb < TARGET_MB else "MISSES"
    print(
        f"peak RSS of the run: {child_peak_mb:.0f} MB ({verdict} the {TARGET_MB} MB target; "
        f"this script's own peak {own_peak_mb:.0f} MB)"
    )
    if rows != args.count:
        sys.exit(f"expected {args.count} rows, found {rows}")


if __name__ == "__main__":
    main()
