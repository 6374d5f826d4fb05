"""Reliability run: hostile inputs by class, kill -9 during indexing, and a 64-client load on ``serve``.

Three parts, each printed as a Markdown table for ``benchmarks/RESULTS.md``:

1. **Hostile inputs.** One folder per class of bad input (elongated images, bombs, truncated and empty
   files, non-images named ``.jpg``, symlinks out of the library, undecodable and control-character
   names, an unreadable subfolder), each beside two good photos, through ``index add`` and
   ``embed images``: exit code, how many good photos made it, how many stderr lines, whether a
   traceback appeared, and the peak RSS of the process (``wait4``'s ``ru_maxrss``). Then bad HTTP
   requests to ``serve`` (oversized, cross-origin, NaN JSON, wrong content type, elongated image):
   status codes, and the server's RSS before and after.
2. **kill -9 trials.** ``index add`` on a folder of photos, killed with SIGKILL after a random delay,
   ``--trials`` times; after each the database must pass ``PRAGMA integrity_check``, and a final
   uninterrupted run must leave every photo indexed exactly once.
3. **Load.** 64 clients for 30 s against ``serve`` (mixed A1111 interrogate, text and image
   embeddings, as ``bench_service.py``): errors, p50/p99 latency, server RSS before and after.

    python benchmarks/bench_reliability.py                       # tiny model for 1 and 2, ViT-B-32 for 3
    python benchmarks/bench_reliability.py --trials 27 --seconds 30 --clients 64
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import drive, free_port, start_server
from common import ROOT, WORK, bundle, machine

PHOTOS = sorted((ROOT / "src" / "clipworks" / "data" / "check_images").glob("*.jpg"))
# Files that have a vector, whatever else the library records about them (errors, deletions).
EMBEDDED = "SELECT f.path FROM files f JOIN embeddings e ON e.file_id = f.id WHERE f.deleted_at IS NULL"
TINY_CONFIG = ROOT / "tests" / "model_configs" / "tiny-vit.json"


def tiny_bundle() -> Path:
    from clipworks.export import export_model

    out = WORK / "tiny-vit__random"
    if not (out / "clipworks.json").is_file():
        export_model(str(TINY_CONFIG), out, pretrained="random", precisions=["fp32"], log=lambda _: None)
    return out


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _gif(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("P", size, 1).save(buf, "GIF")
    return buf.getvalue()


def _bomb() -> bytes:
    """A PNG whose header claims 30000x30000 (900 megapixels) over a few bytes of data: a bomb's shape."""
    import struct
    import zlib

    small = _png((8, 8))
    ihdr = struct.pack(">II", 30000, 30000) + small[24:29]  # new width/height, same depth, colour, ...
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


def _write(folder: Path, name: str | bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
    with open(path, "wb") as f:
        f.write(data)


# Each class writes its bad files into a folder that already holds two good photos.
CLASSES: dict[str, Callable[[Path, Path], None]] = {
    "elongated 40000x1 PNG, 1x40000 GIF": lambda d, _: (
        _write(d, "wide.png", _png((40000, 1))),
        _write(d, "tall.gif", _gif((1, 40000))),
    ),
    "decompression bomb (900 MP PNG)": lambda d, _: _write(d, "bomb.png", _bomb()),
    "truncated JPEG, empty file": lambda d, _: (
        _write(d, "cut.jpg", PHOTOS[0].read_bytes()[:2000]),
        _write(d, "empty.jpg", b""),
    ),
    "non-image named .jpg": lambda d, _: _write(d, "notes.jpg", b"#!/bin/sh\necho not a photo\n" * 20),
    "symlink to a non-image outside the library": lambda d, outside: (
        (outside / "secret.txt").write_text("secret\n"),
        os.symlink(outside / "secret.txt", d / "secret.jpg"),
    ),
    "symlinked folder outside the library": lambda d, outside: (
        (outside / "elsewhere").mkdir(),
        shutil.copy(PHOTOS[2], outside / "elsewhere" / "x.jpg"),
        os.symlink(outside / "elsewhere", d / "linked"),
    ),
    "undecodable and control-character names": lambda d, _: [
        _write(d, name, PHOTOS[i % len(PHOTOS)].read_bytes())
        for i, name in enumerate(
            [
                b"caf\xe9.jpg",
                "new\nline.jpg",
                "tab\there.jpg",
                "-leading.jpg",
                "\u202egpj.evil.jpg",
                "emoji \U0001f600.jpg",
            ]
        )
    ],
    "unreadable subfolder": lambda d, _: (
        (d / "locked").mkdir(),
        shutil.copy(PHOTOS[3], d / "locked" / "y.jpg"),
        os.chmod(d / "locked", 0),
    ),
}


# A child's ru_maxrss starts at the RSS of the process that forked it (Linux keeps the old high-water mark
# across exec), so the command is started by this small wrapper, whose own RSS is a few MiB, and the wrapper
# reports what wait4 says of the command alone.
_WRAPPER = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')\n"
)


def run_measured(cmd: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str, float]:
    """Run ``cmd``; return its exit code, stderr and peak RSS in MiB (the command alone)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
        wrapper = [sys.executable, "-S", "-c", _WRAPPER, report.name, *cmd]
        try:
            subprocess.run(wrapper, stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return -1, "timed out", float("nan")
        maxrss_kb, code = report.read().split()
        err.seek(0)
        return int(code), err.read().decode(errors="replace"), int(maxrss_kb) / 1024


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipworks.cli.main", *args]


def hostile_inputs(model: Path, env: dict[str, str]) -> list[str]:
    rows = [
        "| class | command | exit | good photos kept | stderr lines | traceback | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = Path(tempfile.mkdtemp(prefix="clipworks-hostile-"))
    try:
        # The baseline: the same two good photos with nothing hostile beside them.
        for label, make in [("(baseline: two good photos)", lambda d, o: None), *CLASSES.items()]:
            case = base / f"case{len(rows)}"
            lib, outside = case / "photos", case / "outside"
            lib.mkdir(parents=True)
            outside.mkdir()
            for p in PHOTOS[:2]:
                shutil.copy(p, lib / p.name)
            make(lib, outside)
            db = case / "lib.db"
            for command, args in (
                ("index add", ["index", "add", str(lib), "--db", str(db), "--model", str(model)]),
                ("embed images", ["embed", "images", str(lib), "-o", str(case / "out.npy"), "--model", str(model)]),
            ):
                code, err, rss = run_measured(cli(*args), env)
                kept = _count_kept(command, db, case / "out.npy")
                lines = len([line for line in err.splitlines() if line.strip()])
                rows.append(
                    f"| {label} | `{command}` | {code} | {kept} | {lines} | "
                    f"{'yes' if 'Traceback' in err else 'no'} | {rss:.0f} |"
                )
            os.chmod(case, 0o700)
            for sub in case.rglob("*"):
                if sub.is_dir() and not sub.is_symlink():
                    os.chmod(sub, 0o700)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _count_kept(command: str, db: Path, npy: Path) -> str:
    good = {p.name for p in PHOTOS[:2]}
    if command == "index add":
        if not db.exists():
            return "no db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            con.text_factory = os.fsdecode  # names that are not UTF-8 are stored as their bytes
            names = [r[0] for r in con.execute(EMBEDDED)]
        return f"{sum(1 for n in names if os.path.basename(os.fsdecode(n)) in good)}/2"
    if not npy.exists():
        return "no output"
    import numpy as np

    return f"{len(np.load(npy))} vectors"


def kill_trials(model: Path, env: dict[str, str], trials: int, photos: int) -> list[str]:
    from common import photo_set

    folder = WORK / f"kill-photos-{photos}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for p in photo_set(photos, (800, 600)):
            shutil.copy(p, folder / p.name)
    work = Path(tempfile.mkdtemp(prefix="clipworks-kill-"))
    db = work / "lib.db"
    rng = random.Random(0)
    bad = 0
    killed_mid_run = 0
    try:
        for _ in range(trials):
            proc = subprocess.Popen(
                cli("index", "add", str(folder), "--db", str(db), "--model", str(model), "--batch-size", "8"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            time.sleep(rng.uniform(1.0, 8.0))
            if proc.poll() is None:
                killed_mid_run += 1
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if db.exists():
                with sqlite3.connect(db) as con:
                    if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                        bad += 1
        code, _, _ = run_measured(cli("index", "add", str(folder), "--db", str(db), "--model", str(model)), env)
        with sqlite3.connect(db) as con:
            con.text_factory = os.fsdecode
            paths = [r[0] for r in con.execute(EMBEDDED)]
            ok = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        "| trials | killed mid-run | integrity failures | final run exit | photos | indexed | distinct | integrity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {trials} | {killed_mid_run} | {bad} | {code} | {photos} | {len(paths)} | {len(set(paths))} | {ok} |",
    ]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def http_inputs_and_load(model: Path, clients: int, seconds: float) -> list[str]:
    import requests

    port = free_port()
    proc = start_server(model, "fp32", 32, port)
    url = f"http://127.0.0.1:{port}"
    rows = ["| request | status |", "| --- | --- |"]
    try:
        rss_start = _rss_mib(proc.pid)
        json_type = {"content-type": "application/json"}
        # (what, method, path, request arguments): one row each of the bad-request classes.
        cases: list[tuple[str, str, str, dict]] = [
            ("elongated 40000x1 PNG to /v1/embeddings", "POST", "/v1/embeddings",
             {"files": {"images": ("wide.png", _png((40000, 1)), "image/png")}}),
            ("64 MB body", "POST", "/v1/embeddings", {"data": b"x" * (64 << 20), "headers": json_type}),
            ("cross-site POST (Origin: https://evil.example)", "POST", "/v1/embeddings",
             {"json": {"texts": ["a"]}, "headers": {"Origin": "https://evil.example"}}),
            ("rebinding Host: evil.example", "GET", "/healthz", {"headers": {"Host": "evil.example"}}),
            ("NaN in JSON", "POST", "/v1/embeddings", {"data": b'{"texts": ["a"], "x": NaN}', "headers": json_type}),
            ("invalid UTF-8 JSON", "POST", "/v1/embeddings", {"data": b'{"texts": ["\xff"]}', "headers": json_type}),
            ("text/plain body to a JSON route", "POST", "/sdapi/v1/interrogate",
             {"data": b'{"image": "x"}', "headers": {"content-type": "text/plain"}}),
        ]  # fmt: skip
        for label, method, path, kwargs in cases:
            try:
                status = str(requests.request(method, url + path, timeout=60, **kwargs).status_code)
            except requests.RequestException as e:
                status = f"connection closed ({type(e).__name__})"
            rows.append(f"| {label} | {status} |")
        rss_after_bad = _rss_mib(proc.pid)
        drive(url, clients, 3.0)
        result = drive(url, clients, seconds)
        rss_end = _rss_mib(proc.pid)
        # The same load again: memory that keeps growing run after run would be a leak, not a warm arena.
        again = drive(url, clients, seconds)
        rss_again = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    rows += [
        "",
        f"server RSS: {rss_start:.0f} MiB at start, {rss_after_bad:.0f} MiB after the bad requests, "
        f"{rss_end:.0f} MiB after the load run, {rss_again:.0f} MiB after the same load again "
        f"({again['requests']} requests, {again['errors']} errors)",
        "",
        "| clients | seconds | requests | req/s | errors | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {clients} | {result['seconds']:.1f} | {result['requests']} | {result['throughput']:.1f} | "
        f"{result['errors']} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} |",
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=27, help="kill -9 trials")
    ap.add_argument("--photos", type=int, default=300, help="photos in the kill -9 folder")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--load-model", default="ViT-B-32", help="architecture for the load run (random weights)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: inputs,kill,load")
    args = ap.parse_args()
    skip = set(args.skip.split(","))

    env = dict(os.environ, CLIPWORKS_HOME=str(WORK / "reliability-home"))
    print(f"machine: {machine()}\n")
    model = tiny_bundle()
    if "inputs" not in skip:
        print("\n".join(hostile_inputs(model, env)), "\n", flush=True)
    if "kill" not in skip:
        # A full-size model, so that an index run lasts long enough for most kills to land in the middle of it.
        print("\n".join(kill_trials(bundle(args.load_model, "fp32"), env, args.trials, args.photos)), "\n", flush=True)
    if "load" not in skip:
        print("\n".join(http_inputs_and_load(bundle(args.load_model, "fp32"), args.clients, args.seconds)))


if __name__ == "__main__":
    main()
