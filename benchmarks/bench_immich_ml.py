"""Immich-shaped load on ``clipworks serve --immich``: ``POST /predict`` against clipworks' own ``/v1/embeddings``.

One server process serves both routes from the same ViT-B-32 graph (Immich's route through the "immich"
profile, ``/v1/embeddings`` through open_clip's). Client threads send image requests back to back, each the
body Immich's server builds for Smart Search (multipart: ``entries`` JSON, then the photo as a Blob) or the
same photo as a ``/v1/embeddings`` multipart upload, at 8 and at 32 concurrent clients; the photo is a
1440x1080 JPEG, the size of the preview Immich encodes. The two routes alternate at each client count so that
other load on a shared machine hits both alike.

    python benchmarks/bench_immich_ml.py --model /path/to/ViT-B-32__random --seconds 12
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service
from bench_service import PHOTOS, free_port
from common import ROOT, bundle, machine

IMMICH_NAME = "ViT-B-32__openai"


def preview_jpeg() -> bytes:
    from PIL import Image

    with Image.open(PHOTOS / "baboon.jpg") as im:
        buf = io.BytesIO()
        im.convert("RGB").resize((1440, 1080), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def start_server(model: Path, cache: Path, precision: str, port: int) -> subprocess.Popen:
    import requests

    cmd = [
        sys.executable, "-m", "clipworks.cli.main", "serve", "--model", str(model), "--precision", precision,
        "--port", str(port), "--immich", "--immich-cache-folder", str(cache),
        "--immich-preload", IMMICH_NAME, "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CLIPWORKS_HOME": str(cache / "home")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return bench_service.wait_ready(
        proc, lambda: requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).text == "pong"
    )


def request_for(route: str, photo: bytes) -> tuple[str, Any]:
    """(path, multipart parts): Immich's Smart Search body (entries, then the photo as a Blob), or ours."""
    if route == "immich":
        entries = json.dumps({"clip": {"visual": {"modelName": IMMICH_NAME}}}, separators=(",", ":"))
        return "/predict", [("entries", (None, entries)), ("image", ("blob", photo, "application/octet-stream"))]
    return "/v1/embeddings", [("images", ("photo.jpg", photo, "image/jpeg"))]


def drive(url: str, route: str, photo: bytes, clients: int, seconds: float) -> dict:
    path, files = request_for(route, photo)
    return bench_service.drive(url, clients, seconds, work=lambda _: [(route, path, files)], body="files")


def mean_image_batch(url: str) -> float:
    import requests

    text = requests.get(url + "/metrics", timeout=10).text
    total, count = (float(re.search(rf'clipworks_batch_size_{s}{{kind="image"}} (\S+)', text).group(1))
                    for s in ("sum", "count"))  # fmt: skip
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="A ViT-B-32 bundle (default: exported with random weights).")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--clients", default="8,32")
    args = ap.parse_args()

    model = (args.model or bundle("ViT-B-32")).resolve()
    photo = preview_jpeg()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: {model.name}, {args.precision}; image requests of {len(photo) // 1024} KB (1440x1080 JPEG)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        (cache / "clip").mkdir()
        (cache / "clip" / IMMICH_NAME).symlink_to(model)  # Immich's cache layout, our graph
        port = free_port()
        proc = start_server(model, cache, args.precision, port)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            for route in ("immich", "v1"):
                drive(url, route, photo, 4, 2.0)  # warm-up: sessions, thread pools, connections
            for clients in (int(c) for c in args.clients.split(",")):
                for route in ("immich", "v1"):
                    r = drive(url, route, photo, clients, args.seconds)
                    rows.append((clients, route, r))
                    print(f"{clients} clients, {route}: {r['throughput']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
                          f"p99 {r['p99_ms']:.0f} ms, errors {r['errors']}", flush=True)  # fmt: skip
            mean_batch = mean_image_batch(url)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; mean image batch over the run {mean_batch:.1f}\n")
    print("| clients | route | req/s | p50 ms | p99 ms | errors | requests |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    names = {"immich": "Immich `POST /predict`", "v1": "clipworks `POST /v1/embeddings`"}
    for clients, route, r in rows:
        print(f"| {clients} | {names[route]} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['requests']} |")  # fmt: skip


if __name__ == "__main__":
    main()
