"""``clipworks embed dataset --engine ray`` on a real Ray cluster on this machine: a head and two worker nodes,
each its own raylet, object store and worker processes (``ray.cluster_utils.Cluster``). One worker node is
killed mid-job: the job still ends with every sample in exactly one shard and every file byte for byte what
the local engine writes."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

import clipworks
from clipworks.dataset import embed_dataset
from clipworks.extras import MissingExtra
from test_dataset import jpeg, run, shards, write_shard, write_table

SHARD_KINDS = ("img_emb", "text_emb", "metadata", "errors")
NODE_STORE = 80 << 20  # object store bytes a node: the test's blocks are a few MB


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A head that only coordinates (no CPUs: the job's work runs on the workers, so either may die) and two
    worker nodes of 3 CPUs each (a model actor and decode tasks; after a node dies, the survivor holds both
    actors and still has a CPU to decode with). On this machine only, with no dashboard and no usage reports."""
    from ray.cluster_utils import Cluster

    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", "RAY_TMPDIR")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp = tempfile.mkdtemp(prefix="cw-ray-")  # short: Ray's socket paths must fit 107 bytes
    # Ray 2.60's Cluster writes the head's address under its default temp folder ($RAY_TMPDIR/ray), which
    # only `ray start` creates: keep that file in this cluster's folder too.
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"))
    # A killed node is found dead after 5 missed 1 s health checks (Ray's default waits about half a minute).
    checks = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    head = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": NODE_STORE, "temp_dir": temp,
            "_system_config": checks}  # fmt: skip
    made = Cluster(initialize_head=True, head_node_args=head)
    try:
        made.workers = [made.add_node(num_cpus=3, object_store_memory=NODE_STORE) for _ in range(2)]
        ray.init(address=made.address, log_to_driver=False)
        made.wait_for_nodes()
        yield made
    finally:
        ray.shutdown()
        made.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shard_files(folder: Path) -> dict[str, bytes]:
    return {os.path.relpath(f, folder): Path(f).read_bytes()
            for kind in SHARD_KINDS for f in sorted(glob.glob(str(folder / kind / "*")))}  # fmt: skip


def keys(folder: Path, kind: str) -> list[str]:
    return [k for f in sorted(glob.glob(str(folder / kind / "*.parquet"))) for k in pq.read_table(f)["key"].to_pylist()]


def node_is_found_dead(node_id: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_a_worker_killed_mid_job_changes_nothing(cluster, vit_bundle, tmp_path) -> None:
    """WebDataset tars whose samples straddle the output shards, a corrupt image and a sample without a
    caption among them, captions embedded too; one of the two worker nodes dies after the first batch."""
    from clipworks.dataset_ray import ModelRecipe, RaySettings, embed_dataset_ray

    numbers = shards(tmp_path / "in", [9, 14, 7])
    write_shard(tmp_path / "in" / "00003.tar", [("bad", b"not a jpeg", b"broken"), ("mute", jpeg(99), None)])
    inputs = sorted(str(p) for p in (tmp_path / "in").glob("*.tar"))
    model = clipworks.load(vit_bundle, threads=1)
    local = embed_dataset(model, inputs, "webdataset", tmp_path / "local", enable_text=True, shard_size=5,
                          batch_size=4)  # fmt: skip
    killed = []

    def kill_a_worker(count: int) -> None:
        if not killed:  # the driver waits here, mid-job, while the node and what it held go
            killed.append(cluster.workers[0])
            cluster.remove_node(cluster.workers[0], allow_graceful=False)

    recipe = ModelRecipe(str(vit_bundle), threads=1)
    result = embed_dataset_ray(recipe, inputs, "webdataset", tmp_path / "ray", settings=RaySettings(),
                               enable_text=True, shard_size=5, batch_size=4, on_progress=kill_a_worker)  # fmt: skip
    # The node's processes died at once; the GCS marks it dead only after its missed health checks, which a
    # short job on a quick machine can outrun: wait for that verdict rather than race it.
    assert killed and node_is_found_dead(killed[0].node_id, within_s=60)
    assert (result.embedded, result.failed, result.shards_written) == (local.embedded, local.failed,
                                                                        local.shards_written)  # fmt: skip
    expected = [f"{i:09d}" for shard in numbers for i in shard] + ["bad", "mute"]
    embedded, failed = keys(tmp_path / "ray", "metadata"), keys(tmp_path / "ray", "errors")
    assert sorted(embedded + failed) == sorted(expected) and len(embedded) + len(failed) == len(expected)
    assert set(failed) == {"bad", "mute"}
    ours, theirs = shard_files(tmp_path / "ray"), shard_files(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and len(ours) == 4 * 7  # 32 samples in 7 shards, 4 files each
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_cli_engine_ray_resumes_tables_like_the_local_engine(capsys, cluster, vit_bundle, tmp_path) -> None:
    """Two CSV tables (keys numbered across both), through the CLI; a shard removed from a finished folder is
    all the Ray engine writes again."""
    (tmp_path / "img").mkdir()
    tables = []
    for t, ids in enumerate((range(0, 6), range(6, 11))):
        (tmp_path / f"t{t}").mkdir()
        for i in ids:
            (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows = [{"url": str(tmp_path / "img" / f"{i}.jpg"), "caption": f"thing {i}"} for i in ids]
        tables.append(write_table(tmp_path / f"t{t}", "csv", rows))
    common = ["embed", "dataset", *tables, "--shard-size", 4, "-m", vit_bundle, "--batch-size", 3, "--threads", 1]
    code, err = run(capsys, *common, "--output-folder", tmp_path / "local")
    assert code == 0, err
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    for kind in SHARD_KINDS:
        (tmp_path / "ray" / kind / f"{kind}_00001.{'npy' if kind.endswith('emb') else 'parquet'}").unlink(True)
    code, err = run(capsys, *common, "--output-folder", tmp_path / "ray", "--engine", "ray")
    assert code == 0, err
    assert "embedded 4 images into 1 shards, 2 finished shards skipped" in err
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
    assert keys(tmp_path / "ray", "metadata") == [f"{i:09d}" for i in range(11)]
    # A table without an image column is found by a counting task on a worker: still one line, non-zero exit.
    bad = write_table(tmp_path, "csv", [{"name": "x.jpg"}])
    code, err = run(capsys, "embed", "dataset", bad, "--output-folder", tmp_path / "bad", "-m", vit_bundle,
                    "--engine", "ray")  # fmt: skip
    assert code != 0 and "Traceback" not in err and "has none of the columns" in err.strip().splitlines()[-1], err


def test_the_ray_engine_refuses_a_resume_whose_inputs_changed(cluster, vit_bundle, tmp_path) -> None:
    """The driver checks the finished shards against its plan as the local engine does (tests/test_dataset.py)."""
    from clipworks.dataset_ray import ModelRecipe, embed_dataset_ray
    from clipworks.errors import UsageError

    shards(tmp_path / "in", [3, 3])
    inputs = sorted(str(p) for p in (tmp_path / "in").glob("*.tar"))
    model = clipworks.load(vit_bundle, threads=1)
    embed_dataset(model, inputs, "webdataset", tmp_path / "out", shard_size=2)
    for path in (tmp_path / "out").rglob("*_00002.*"):
        path.unlink()  # shard 2 lost: Ray would write it again
    write_shard(
        tmp_path / "in" / "00000.tar", [("first", jpeg(50), None), *[(f"{i:09d}", jpeg(i), None) for i in (1, 2)]]
    )
    recipe = ModelRecipe(str(vit_bundle), threads=1)
    with pytest.raises(UsageError, match=r"finished shard 0 holds other samples .*'(first|000000000)'"):
        embed_dataset_ray(recipe, inputs, "webdataset", tmp_path / "out", shard_size=2)
    assert not list((tmp_path / "out").rglob("*_00002.*"))


def test_auto_precision_is_what_the_actors_choose_not_the_driver(
    cluster, int8_static_vit_bundle, tmp_path, monkeypatch
) -> None:
    """The driver's CPU says nothing of the workers': here the driver is told this CPU has the opposite of its
    int8 dot products (the worker processes still see the truth). Every actor runs the precision one task on an
    actor's resources chose, and job.json records it: the vectors are those of the local engine at it."""
    from clipworks.dataset_ray import ModelRecipe, embed_dataset_ray
    from clipworks.machine import this_machine
    from clipworks.runtime import encoder

    real = this_machine()
    chosen = "int8-static" if real.has_int8_dot_product else "fp32"
    opposite = ("AVX2",) if real.has_int8_dot_product else ("AVX2", "AVX-512", "VNNI")
    shards(tmp_path / "in", [5])
    inputs = [str(tmp_path / "in" / "00000.tar")]
    local = clipworks.load(int8_static_vit_bundle, precision=chosen, threads=1)
    embed_dataset(local, inputs, "webdataset", tmp_path / "local", shard_size=5, batch_size=4)
    monkeypatch.setattr(encoder, "this_machine", lambda: dataclasses.replace(real, features=opposite))
    assert clipworks.load(int8_static_vit_bundle, threads=1).precision != chosen  # what the driver would pick
    recipe = ModelRecipe(str(int8_static_vit_bundle), threads=1)
    embed_dataset_ray(recipe, inputs, "webdataset", tmp_path / "ray", shard_size=5, batch_size=4)
    assert json.loads((tmp_path / "ray" / "job.json").read_text())["precision"] == chosen
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")


def test_without_ray_the_message_names_the_extra(monkeypatch, vit_bundle, tmp_path) -> None:
    from clipworks.dataset_ray import ModelRecipe, embed_dataset_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra sees: import fails
    message = r"--engine ray needs ray, which is not installed: pip install 'clipworks\[ray\]'"
    with pytest.raises(MissingExtra, match=message):
        embed_dataset_ray(ModelRecipe(str(vit_bundle)), [str(tmp_path)], "files", tmp_path / "out", shard_size=4)
    assert not (tmp_path / "out").exists()
