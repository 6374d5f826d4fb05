"""`clipworks index add` beside rclip on the same photos, same architecture, fresh database each run.

rclip 3.x indexes with ONNX Runtime (ViT-B-32-256); it runs offline when ``$RCLIP_DATADIR`` holds its model
files, so both tools get the same random-weight ViT-B-32-256 export (speed does not depend on the weights):
our bundle's visual and textual graphs with their inputs renamed to ``input`` (rclip feeds ``{"input": ...}``),
open_clip's BPE vocabulary, and placeholders for the licence files rclip checks for. rclip lives in its own
virtual environment (``--rclip``), never in clipworks'.

Each repetition runs every configuration once, in turn, so the machine's load (other agents) falls on all of
them alike; wall time and the CPU time of the child process (user + system, all threads) are per image.

    python benchmarks/bench_index.py --rclip /work/rclip-venv/bin/rclip --reps 3
    python benchmarks/bench_index.py --configs   # the pipeline's core budget: threads, spinning, decoders
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # rclip/model_download.py MODEL_SUBDIR
RCLIP_LEGAL_FILES = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")


def rclip_datadir(bundle: Path) -> Path:
    """An ``$RCLIP_DATADIR`` holding ``bundle``'s graphs as rclip's model files."""
    import onnx
    import open_clip

    out = common.WORK / "rclip-datadir"
    models = out / RCLIP_MODEL_DIR
    models.mkdir(parents=True, exist_ok=True)
    for tower in ("visual", "textual"):
        dest = models / f"{tower}.onnx"
        if dest.exists():
            continue
        graph = onnx.load(str(bundle / tower / "model.onnx"))
        first = graph.graph.input[0]
        old = first.name
        first.name = "input"
        for node in graph.graph.node:
            node.input[:] = ["input" if name == old else name for name in node.input]
        if first.type.tensor_type.elem_type == onnx.TensorProto.INT32:
            # rclip's tokenizer gives int64 token ids; our text graph takes int32: cast at the door.
            first.type.tensor_type.elem_type = onnx.TensorProto.INT64
            graph.graph.node.insert(
                0, onnx.helper.make_node("Cast", ["input"], ["input_int32"], to=onnx.TensorProto.INT32)
            )
            for node in graph.graph.node[1:]:
                node.input[:] = ["input_int32" if name == "input" else name for name in node.input]
        onnx.save(graph, str(dest))
    vocab = out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    vocab.parent.mkdir(exist_ok=True)
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", vocab)
    for name in RCLIP_LEGAL_FILES:
        (out / name).write_text("placeholder: random-weight benchmark model\n")
    return out


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run; its output is shown only if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def core_budget(bundle: Path, photos: list[Path], reps: int) -> None:
    """The decode -> encode pipeline alone (no database) under each split of the cores: wall and CPU ms per
    image, against the ceiling ``decode core-s + model core-s`` per image measured one at a time."""
    from dataclasses import replace

    import clipworks
    from clipworks.bench import time_decode
    from clipworks.pipeline import iter_embeddings
    from clipworks.runtime.sessions import RuntimeSettings

    cores = len(os.sched_getaffinity(0))
    probe = clipworks.load(bundle, precision="fp32", preprocess="fast")
    decode_s, _ = time_decode(probe, photos[:20], "fast")
    pixels = [probe.preprocess(p) for p in photos[:32]]
    import numpy as np

    batch = np.stack(pixels)
    probe.embed_image_batch(batch)
    cpu, start = time.process_time(), time.perf_counter()
    probe.embed_image_batch(batch)
    model_wall, model_cpu = (time.perf_counter() - start) / len(batch), (time.process_time() - cpu) / len(batch)
    print(f"one at a time: decode {decode_s * 1000:.1f} core-ms/img (fast), model {model_wall * 1000:.1f} ms/img "
          f"wall = {model_cpu * 1000:.1f} CPU-ms/img on {cores} threads")  # fmt: skip
    print(
        f"ceiling: {(decode_s + model_cpu) * 1000:.1f} CPU-ms/img; "
        f"{max(model_wall, (decode_s + model_cpu) / cores) * 1000:.1f} ms/img wall on {cores} cores"
    )
    variants = {
        f"{cores} ORT threads spinning, {cores} decoders (before)": (RuntimeSettings(allow_spinning=True), cores),
        f"{cores} ORT threads not spinning, {cores} decoders (now)": (RuntimeSettings(), cores),
        f"{cores} ORT threads not spinning, 1 decoder": (RuntimeSettings(), 1),
        f"{max(1, cores - 1)} ORT threads spinning, 1 decoder": (RuntimeSettings(threads=max(1, cores - 1),
                                                                  allow_spinning=True), 1),
    }  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (runtime, workers) in variants.items():
            model = clipworks.load(bundle, precision="fp32", preprocess="fast", runtime=replace(runtime))
            list(iter_embeddings(model, photos[:8], batch_size=8, workers=workers))  # load and warm the session
            cpu, start = time.process_time(), time.perf_counter()
            for _batch in iter_embeddings(model, photos, batch_size=32, workers=workers):
                pass
            wall, used = time.perf_counter() - start, time.process_time() - cpu
            results[name].append((wall / len(photos), used / len(photos)))
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"  {name:56s} {wall * 1000:6.1f} ms/img wall {cpu * 1000:6.1f} CPU-ms/img")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rclip", help="rclip executable (in its own venv); omit to time clipworks only")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--configs", action="store_true", help="time the pipeline's thread/spinning variants instead")
    args = parser.parse_args()

    from clipworks.models.bundle import DEFAULT_PRECISIONS, load_bundle
    from clipworks.runtime.encoder import ClipModel

    # The graphs a first-use export holds, so that the defaults run what they run for a user.
    bundle = common.bundle("ViT-B-32-256", ",".join(DEFAULT_PRECISIONS))
    default = ClipModel(load_bundle(bundle))  # what auto picks here; sessions load only on first use
    auto = f"{default.precision} on {default.backend.name}"
    photos = common.mixed_photo_set(args.photos)
    folder = photos[0].parent
    clipworks = [
        sys.executable,
        "-c",
        "from clipworks.cli.main import entry; entry()",
        "index",
        "add",
        str(folder),
        "--model",
        str(bundle),
        "--ann",
        "off",
    ]
    runs: dict[str, tuple[list[str], dict[str, str]]] = {
        f"clipworks (defaults: fast decode, {auto} here)": (clipworks, {}),
        "clipworks --precision fp32": ([*clipworks, "--precision", "fp32"], {}),
        # where auto runs OpenVINO (AMX), the same precision on ONNX Runtime beside it
        **(
            {f"clipworks --device cpu ({default.precision} on ORT)": ([*clipworks, "--device", "cpu"], {})}
            if default.backend.name != "cpu"
            else {}
        ),
        "clipworks --preprocess exact --precision fp32": (
            [*clipworks, "--preprocess", "exact", "--precision", "fp32"],
            {},
        ),
    }
    if args.configs:
        core_budget(bundle, photos, args.reps)
        return
    if args.rclip:
        datadir = rclip_datadir(bundle)
        # rclip indexes the current folder, then answers the query; -f -t 1 keeps the answer to one line.
        env = {"RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}
        runs["rclip 3.3 (index, then one query)"] = ([args.rclip, "-f", "-t", "1", "a photo"], env)
    db = common.WORK / "bench-index.db"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for rep in range(args.reps):
        for name, (cmd, extra) in runs.items():
            env = {**os.environ, **extra, "CLIPWORKS_DB": str(db), "PYTHONPATH": str(common.ROOT / "src")}
            for stale in [*db.parent.glob(db.name + "*"), *common.WORK.glob("rclip-datadir/db.sqlite3*")]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            times[name].append(timed(cmd, folder, env))
            wall, cpu = times[name][-1]
            print(f"rep {rep}: {name}: {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    print(f"\n{common.machine()}\nload: {os.getloadavg()}  photos: {len(photos)} ({folder})")
    base = statistics.median(w for w, _ in times[next(iter(runs))])
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        n = len(photos)
        print(f"{name:48s} {wall / n * 1000:7.1f} ms/img wall {cpu / n * 1000:7.1f} CPU-ms/img  "
              f"wall vs first {wall / base:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
