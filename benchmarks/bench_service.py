"""Load test of ``clipworks serve``: 32 concurrent clients on loopback, mixed requests, batching on vs off.

Each configuration starts its own server process (so the load generator does not share its GIL), warms it
up, then 32 client threads send requests back to back for ``--seconds``: a third Automatic1111 interrogate
calls, a third text embeddings, a third image embeddings (a fixed seeded mix, the same for both runs).
Reported: throughput, p50/p99 latency, errors (must be 0) and the mean batch the worker ran, for dynamic
batching (``--max-batch 32``) and for batch size 1 (``--max-batch 1``, otherwise identical).

    python benchmarks/bench_service.py                 # ViT-B-32 random weights, fp32, 2 x 30 s
    python benchmarks/bench_service.py --precision int8 --seconds 10
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORK, bundle, machine

PHOTOS = ROOT / "src" / "clipworks" / "data" / "check_images"
TEXTS = [
    "a photo of a dog playing in the park",
    "a red car parked on a street",
    "two people walking on a beach at sunset",
    "a bowl of fruit on a kitchen table",
    "a robot arm picking up a box",
    "a cat",
    "an aerial view of a city at night with many lights",
    "a forklift in a warehouse",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, precision: str, max_batch: int, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "clipworks.cli.main", "serve", "--model", str(model), "--precision", precision,
        "--port", str(port), "--max-batch", str(max_batch), "--preload", "--log-level", "warning",
    ]  # fmt: skip
    env_home = WORK / "service-home"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(env_home))
    import requests

    return wait_ready(proc, lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["loaded"])


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> subprocess.Popen:
    """``proc`` once ``ready()`` is true (errors count as not yet); its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if ready():
                return proc
        except Exception:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout:.0f} s")


def _env(home: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["CLIPWORKS_HOME"] = str(home)  # the tag-vocabulary cache, shared by both runs
    return env


def make_requests(seed: int) -> list[tuple[str, str, dict]]:
    images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(PHOTOS.glob("*.jpg"))]
    rng = random.Random(seed)
    out = []
    for _ in range(4096):
        kind = rng.choice(["interrogate", "embed-text", "embed-image"])
        if kind == "interrogate":
            out.append((kind, "/sdapi/v1/interrogate", {"image": rng.choice(images), "model": "clip"}))
        elif kind == "embed-text":
            out.append((kind, "/v1/embeddings", {"texts": [rng.choice(TEXTS)]}))
        else:
            out.append((kind, "/v1/embeddings", {"images": [rng.choice(images)]}))
    return out


def drive(
    url: str,
    clients: int,
    seconds: float,
    work: Callable[[int], list[tuple[str, str, dict]]] = make_requests,
    body: str = "json",
) -> dict:
    """``clients`` threads send ``work(i)``'s (kind, path, body) requests back to back for ``seconds``;
    ``body`` is the ``requests`` argument each body goes in ("json", or "files" for multipart)."""
    import requests

    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        session = requests.Session()
        requests_of_client = work(i)
        barrier.wait()
        n = 0
        while time.monotonic() < stop:
            kind, path, payload = requests_of_client[n % len(requests_of_client)]
            n += 1
            t0 = time.perf_counter()
            try:
                r = session.post(url + path, timeout=60, **{body: payload})
                ok = r.status_code == 200
            except Exception:
                ok = False
            latencies[i].append(time.perf_counter() - t0)
            if not ok:
                errors[i] += 1
            with lock:
                kinds[kind] = kinds.get(kind, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([x for per in latencies for x in per])
    return {
        "requests": int(lat.size),
        "seconds": wall,
        "throughput": lat.size / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "errors": int(sum(errors)),
        "mix": kinds,
    }


def batch_stats(url: str) -> dict:
    import requests

    text = requests.get(url + "/metrics", timeout=10).text
    out = {}
    for kind in ("image", "text"):
        total = float(re.search(rf'clipworks_batch_size_sum{{kind="{kind}"}} (\S+)', text).group(1))
        count = float(re.search(rf'clipworks_batch_size_count{{kind="{kind}"}} (\S+)', text).group(1))
        out[kind] = total / count if count else 0.0
    return out


def run_config(model: Path, precision: str, max_batch: int, clients: int, seconds: float) -> dict:
    port = free_port()
    proc = start_server(model, precision, max_batch, port)
    url = f"http://127.0.0.1:{port}"
    try:
        drive(url, clients, 3.0)  # warm-up: sessions, thread pools, connection set-up
        before = batch_stats(url)
        result = drive(url, clients, seconds)
        result["mean_batch"] = batch_stats(url)
        result["mean_batch_warmup"] = before
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--rounds", type=int, default=1, help="Alternate the two configurations this many times.")
    ap.add_argument("--json", type=Path, help="Also write the raw results here.")
    args = ap.parse_args()

    model = bundle("ViT-B-32")
    print(f"machine: {machine()}")
    print(f"model: ViT-B-32 random weights, {args.precision}; {args.clients} clients x {args.seconds:.0f} s each")
    configs = (("dynamic batching (max 32, 5 ms wait)", 32), ("batch size 1", 1))
    results: dict[str, list[dict]] = {label: [] for label, _ in configs}
    # Rounds alternate the two configurations so that other load on a shared machine hits both alike.
    for round_ in range(args.rounds):
        for label, max_batch in configs:
            r = run_config(model, args.precision, max_batch, args.clients, args.seconds)
            results[label].append(r)
            print(
                f"round {round_ + 1}, {label}: {r['throughput']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
                f"p99 {r['p99_ms']:.0f} ms, errors {r['errors']}, {r['requests']} requests {r['mix']}, "
                f"mean batch image {r['mean_batch']['image']:.1f} text {r['mean_batch']['text']:.1f}",
                flush=True,
            )
    print()
    print("| configuration | req/s | p50 ms | p99 ms | errors | requests |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = {}
    for label, runs in results.items():
        n = sum(r["requests"] for r in runs)
        rate = n / sum(r["seconds"] for r in runs)
        totals[label] = rate
        p50 = np.median([r["p50_ms"] for r in runs])
        p99 = max(r["p99_ms"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        print(f"| {label} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {errors} | {n} |")
    dyn, one = totals.values()
    print(f"\ngain of dynamic batching: {dyn / one:.2f}x throughput")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
