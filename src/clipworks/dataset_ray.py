"""``clipworks embed dataset --engine ray``: the same job on a Ray cluster, with the same shards.

The driver plans the job as the local engine numbers it (``count_samples`` per input, run as Ray tasks, then
``plan_shards``), skips the finished shards, and streams the rest through one Ray Data pipeline:

    read (one task per input slice: the samples' bytes)  ->  decode (tasks: pixels)  ->  embed (``map_batches``
    on a pool of model actors: one per GPU, or per ``gpus_per_actor`` fraction of one, else one per machine)

with ``preserve_order``, so the rows come back to the driver in input order and go through the local engine's
``ShardSink`` and ``ShardWriter``: the same partitioning into shards, the same row order, the same bytes (ONNX
Runtime embeds each image the same whichever batch it is in). The driver alone writes, and a shard is renamed
into place once whole, so a sample lands in exactly one committed shard; a worker that dies mid-job has its
tasks run again elsewhere (Ray retries tasks, restarts actors and rebuilds lost blocks from their lineage), and
a retried task reads and embeds the same samples into the same values.

Inputs are read on the workers: on a cluster of several machines they must be paths every machine sees (a
shared filesystem) or fsspec URLs (``s3://``, ``gs://``); the output folder is written by the driver.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.dataset import (
    DatasetResult,
    InputSlice,
    Sample,
    ShardSink,
    _caption_embeddings,
    check_finished_shard,
    check_no_shards_beyond,
    count_samples,
    decode_sample,
    finished_samples,
    load_sample,
    open_job,
    plan_shards,
    read_slice,
    shard_done,
)
from clipworks.errors import BadImage, ClipworksError, UsageError
from clipworks.extras import require
from clipworks.outputs import SHARD_DTYPE
from clipworks.runtime.encoder import ClipModel, load

# Columns a row carries from the reader to the driver (the metadata columns plus its place and its error).
ROW_COLUMNS = ("index", "key", "image_path", "caption", "has_caption", "width", "height", "error")
# The object store of a Ray started here. Ray Data holds back the decode tasks once the blocks in flight fill
# their share of it, and at 512 MB the model actor waited for input (bench_ray.py, 5,000 images on 2 cores,
# float32 pixels then: 80.4 images/s at 512 MB, 86.1 at 2 GB; a batch of 32 ViT-B/32 inputs is now 4.8 MB of
# uint8). Ray only reserves it: pages are used as blocks are stored.
LOCAL_OBJECT_STORE_MB = 2048
# What a model actor reserves of Ray's CPUs: its session's threads are ONNX Runtime's (the machine's cores or
# --threads), not Ray's. Half a CPU, unlike the decode tasks' one, also keeps Ray Data from fusing the decode
# tasks into the actors, where each actor would decode its batches one image at a time before embedding them.
ACTOR_CPUS = 0.5
READ_TASK_CPUS = 0.5  # reading is I/O: half a CPU, so it does not fuse into the decode tasks and runs beside them
DECODE_TASK_CPUS = 1.0  # decoding is CPU work; at the actor's half CPU Ray Data would fuse it into the actor


@dataclass(frozen=True)
class ModelRecipe:
    """How to load the model, sent to the workers in place of the model: each loads its own copy (an ONNX
    Runtime session does not travel). ``device`` and ``precision`` resolve where the model runs."""

    name_or_path: str
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    preprocess: str = "exact"

    def load(self) -> ClipModel:
        return load(self.name_or_path, self.device, self.precision, threads=self.threads, preprocess=self.preprocess)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RaySettings:
    """Where the job runs and how the model actors are placed."""

    address: str | None = None  # None: start Ray on this machine; "auto" or "ray://HOST:PORT": join that cluster
    actors: int | None = None  # default: one per GPU (see gpus_per_actor), else one per machine with CPUs
    gpus_per_actor: float = 0.0  # > 0: each model actor holds this share of a GPU (0.5: two actors a GPU)

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UsageError(f"--actors must be at least 1, not {self.actors}")
        if self.gpus_per_actor < 0:
            raise UsageError(f"--gpus-per-actor must be 0 (CPU) or more, not {self.gpus_per_actor}")


def _ray() -> Any:
    require(("ray", "ray.data"), "ray", "--engine ray")
    import ray

    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: to ``address``, or to a Ray this process already joined, or to one started here (and
    stopped at the end) with no dashboard and no usage reports."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_MB << 20,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UsageError(f"cannot join the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


# -- the pipeline's stages (run on the workers) ----------------------------------------------------------

_models: dict[ModelRecipe, ClipModel] = {}


def _model(recipe: ModelRecipe) -> ClipModel:
    """One model a worker process (its towers load on first use: a decoder never builds a session)."""
    if recipe not in _models:
        _models[recipe] = recipe.load()
    return _models[recipe]


def _columns(rows: Sequence[dict[str, Any]], **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Rows as the pipeline carries them: typed columns without None (Ray's blocks would make it NaN), so an
    absent caption is ``has_caption`` False, an absent size -1 and no error ""."""
    return {
        "index": np.array([row["index"] for row in rows], np.int64),
        "key": np.array([row["key"] for row in rows], dtype=object),
        "image_path": np.array([row["image_path"] for row in rows], dtype=object),
        "caption": np.array([row["caption"] or "" for row in rows], dtype=object),
        "has_caption": np.array([row["caption"] is not None for row in rows], bool),
        "width": np.array([-1 if row["width"] is None else row["width"] for row in rows], np.int64),
        "height": np.array([-1 if row["height"] is None else row["height"] for row in rows], np.int64),
        "error": np.array([row["error"] or "" for row in rows], dtype=object),
        **arrays,
    }


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """``_columns`` back: dicts with ``index``, ``error`` (None: embedded) and the metadata columns."""
    return [
        {
            "index": int(batch["index"][i]),
            "key": str(batch["key"][i]),
            "image_path": str(batch["image_path"][i]),
            "caption": str(batch["caption"][i]) if batch["has_caption"][i] else None,
            "width": None if batch["width"][i] < 0 else int(batch["width"][i]),
            "height": None if batch["height"][i] < 0 else int(batch["height"][i]),
            "error": str(batch["error"][i]) or None,
        }
        for i in range(len(batch["index"]))
    ]


def _passed_on(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: batch[name] for name in ROW_COLUMNS}


def read_stage(
    pieces: dict[str, np.ndarray], *, fmt: str, columns: dict[str, str | None], enable_text: bool, rows_per_block: int
) -> Iterator[dict[str, np.ndarray]]:
    """Each input slice's samples with their bytes (or their error), a block of rows at a time."""
    for path, first, start, stop in zip(pieces["path"], pieces["first"], pieces["start"], pieces["stop"], strict=True):
        rows, data = [], []
        for sample in read_slice(InputSlice(str(path), int(first), int(start), int(stop)), fmt, **columns):
            load_sample(sample, enable_text)
            rows.append({**sample.row(), "index": sample.index, "error": sample.error})
            data.append(sample.data or b"")
            if len(rows) == rows_per_block:
                yield _columns(rows, data=np.array(data, dtype=object))
                rows, data = [], []
        if rows:
            yield _columns(rows, data=np.array(data, dtype=object))


def decode_stage(batch: dict[str, np.ndarray], *, recipe: ModelRecipe) -> dict[str, np.ndarray]:
    """Bytes -> the uint8 pixels before normalising (the actor normalises them: a quarter of float32's bytes
    through the object store); a sample that does not decode gets its error (and zero pixels, unused)."""

    model = _model(recipe)
    errors = [str(error) for error in batch["error"]]
    decoded = []
    for i, data in enumerate(batch["data"]):
        sample = Sample(
            int(batch["index"][i]),
            str(batch["key"][i]),
            str(batch["image_path"][i]),
            data=data,
            error=errors[i] or None,
        )
        try:
            decoded.append(decode_sample(model, sample, normalised=False))
        except BadImage as e:
            errors[i] = str(e)
            decoded.append(None)
    shape = next((p.shape for p in decoded if p is not None), (1, 1, 3))
    pixels = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in decoded])
    return {**_passed_on(batch), "error": np.array(errors, dtype=object), "pixels": pixels}


class EmbedStage:
    """A model actor: holds one loaded model and embeds the decoded rows of each batch it is given."""

    def __init__(self, recipe: ModelRecipe, enable_text: bool) -> None:
        self.model = recipe.load()
        self.model.load_towers("visual", *(["textual"] if enable_text else []))
        self.enable_text = enable_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, error in enumerate(batch["error"]) if not error]
        dim = self.model.embed_dim
        out = _passed_on(batch)
        out["img_emb"] = np.zeros((len(batch["index"]), dim), SHARD_DTYPE)
        if ok:
            out["img_emb"][ok] = self.model.embed_image_batch(self.model.to_model_pixels(batch["pixels"][ok]))
        if self.enable_text:
            out["text_emb"] = np.zeros_like(out["img_emb"])
            samples = [Sample(0, "", "", caption=str(batch["caption"][i])) for i in ok]
            if ok:
                out["text_emb"][ok] = _caption_embeddings(self.model, samples)
        return out


# -- the driver --------------------------------------------------------------------------------------------


def _cause(error: BaseException) -> ClipworksError | None:
    """The clipworks error a task raised, under Ray's wrappers (``RayTaskError``, which also poses as an
    instance of its cause's class, and Ray Data's ``UserCodeException``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClipworksError) and type(current).__module__.startswith("clipworks"):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _actor_placement(ray: Any, settings: RaySettings) -> tuple[int, dict[str, Any]]:
    """How many model actors, and what each holds: GPUs when asked for, else one actor a machine."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if settings.gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < settings.gpus_per_actor:
            raise UsageError(f"--gpus-per-actor {settings.gpus_per_actor}: the Ray cluster has {gpus:g} GPUs")
        count = settings.actors or max(1, int(gpus / settings.gpus_per_actor))
        return count, {"num_gpus": settings.gpus_per_actor, "num_cpus": ACTOR_CPUS}
    # One per machine (Ray Data spreads actors over the machines): its ONNX Runtime session uses the machine's
    # cores (or --threads), as the local engine's does, and the machine's CPUs run decode tasks beside it.
    return settings.actors or max(1, len(nodes)), {"num_cpus": ACTOR_CPUS}


def _with_precision(ray: Any, recipe: ModelRecipe, actor_resources: dict[str, Any]) -> ModelRecipe:
    """``recipe`` with ``auto`` precision resolved once, by a task holding what a model actor holds (a GPU
    share, or CPUs): every actor then runs that one precision, so machines that would each choose another
    (VNNI or not) still write one dataset of one precision, and ``job.json`` records what the vectors are
    (the driver's own CPU, or its lack of a GPU, says nothing of the actors')."""
    if recipe.precision != "auto":
        return recipe
    resolve = ray.remote(**actor_resources)(_resolved_precision)
    return replace(recipe, precision=ray.get(resolve.remote(recipe)))


def _resolved_precision(recipe: ModelRecipe) -> str:
    return recipe.load().precision


def embed_dataset_ray(
    recipe: ModelRecipe,
    paths: Sequence[str],
    fmt: str,
    output_folder: str | Path,
    *,
    settings: RaySettings | None = None,
    enable_text: bool = False,
    shard_size: int,
    batch_size: int = 32,
    image_column: str | None = None,
    caption_column: str | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> DatasetResult:
    """``embed_dataset`` on a Ray cluster: the same files, rows and bytes (see the module's docstring)."""
    settings = settings or RaySettings()
    settings.check()
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    _ray()
    # The driver's copy only names the job and its width (no session): on the CPU, as the driver of a GPU
    # cluster may have no GPU itself.
    model = load(recipe.name_or_path, "cpu")
    columns = {"image_column": image_column, "caption_column": caption_column}
    start = time.perf_counter()
    result = DatasetResult()
    try:
        with ray_session(settings.address) as ray:
            placement = _actor_placement(ray, settings)
            recipe = _with_precision(ray, recipe, placement[1])
            folder = open_job(model, paths, fmt, output_folder, shard_size=shard_size, enable_text=enable_text,
                              columns=columns, precision=recipe.precision)  # fmt: skip
            count = ray.remote(num_cpus=0.5)(count_samples)
            counts = ray.get([count.remote(path, fmt, **columns) for path in paths])
            plan = plan_shards(paths, counts, shard_size)
            check_no_shards_beyond(folder, max(plan, default=-1))
            done = {shard for shard in plan if shard_done(folder, shard, retry_failed)}
            for shard, samples in finished_samples(paths, counts, fmt, shard_size, done, **columns).items():
                check_finished_shard(folder, shard, samples)
            pieces = []
            for shard in sorted(plan):
                if shard in done:
                    result.skip(folder, shard)
                else:
                    pieces += plan[shard]
            sink = ShardSink(folder, model.embed_dim, shard_size, result, text=enable_text)
            try:
                if pieces:
                    for batch in _pipeline(ray, pieces, recipe, fmt, columns, placement, enable_text, batch_size):
                        rows = _rows(batch)
                        sink.add(rows, batch["img_emb"], batch.get("text_emb"))
                        if on_progress:
                            on_progress(len(rows))
                sink.close()
            finally:
                sink.discard()
    except Exception as e:
        cause = _cause(e)
        if cause is None or cause is e:
            raise
        raise cause from None  # its one-line message; Ray's copy of the remote traceback is in Ray's logs
    result.seconds = time.perf_counter() - start
    return result


def _pipeline(
    ray: Any,
    pieces: Sequence[InputSlice],
    recipe: ModelRecipe,
    fmt: str,
    columns: dict[str, Any],
    placement: tuple[int, dict[str, Any]],
    enable_text: bool,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """The embedded rows of ``pieces``, in input order, a batch at a time, on ``placement``'s actors."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the shards' row order is the input order
    context.enable_progress_bars = False
    actors, actor_resources = placement
    items = [{"path": p.path, "first": p.first, "start": p.start, "stop": p.stop} for p in pieces]
    # Fault tolerance is Ray Data's default: a task whose worker dies is run again, an actor that dies is
    # restarted (and its batches retried), lost blocks are rebuilt from their lineage. A task's own exception
    # (a clipworks error) is not retried: it ends the job with its message.
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_stage,
            batch_size=1,
            num_cpus=READ_TASK_CPUS,
            fn_kwargs={"fmt": fmt, "columns": columns, "enable_text": enable_text, "rows_per_block": batch_size},
        )
        .map_batches(decode_stage, batch_size=batch_size, num_cpus=DECODE_TASK_CPUS, fn_kwargs={"recipe": recipe})
        .map_batches(
            EmbedStage,
            batch_size=batch_size,
            concurrency=actors,
            fn_constructor_args=(recipe, enable_text),
            **actor_resources,
        )
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
