"""``clipworks bench``: what it measures, that its ceiling follows from its own figures, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clipworks.cli.main import main
from clipworks.machine import CPU_FEATURES, this_machine
from conftest import STATIC_BATCH


def bench_json(capsys, *args: str | Path) -> dict:
    code = main(["bench", "--seconds", "0.05", "--images", "8", "--json", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_bench_reports_every_batch_size_the_ceiling_and_end_to_end(capsys, vit_bundle, photos, tmp_path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    report = bench_json(capsys, "-m", vit_bundle, "--photos", folder, "--batch-sizes", "1,4")

    assert [t["batch"] for t in report["model_only"]] == [1, 4]
    for timing in report["model_only"]:
        assert timing["images_per_s"] == pytest.approx(timing["batch"] / (timing["latency_ms"] / 1000), rel=1e-6)
    assert report["photos"] == 3 and len(report["skipped"]) == 1 and "broken.jpg" in report["skipped"][0]
    assert report["decode_ms"] > 0
    # The ceiling is the printed formula applied to the printed figures (the pipeline runs at batch 4 here).
    model_rate = report["model_only"][1]["images_per_s"]
    cpu_bound = report["threads"] / ((report["decode_ms"] + report["model_cpu_ms"]) / 1000)
    assert report["ceiling_images_per_s"] == pytest.approx(min(cpu_bound, model_rate), rel=1e-6)
    assert report["bound"] == ("cpu" if cpu_bound < model_rate else "model")
    assert report["end_to_end_images_per_s"] > 0 and report["end_to_end_cpu_ms"] > 0 and report["model_cpu_ms"] > 0
    assert report["share_of_ceiling"] == pytest.approx(
        report["end_to_end_images_per_s"] / report["ceiling_images_per_s"], abs=1e-4
    )
    assert report["providers"] == ["CPUExecutionProvider"] and report["precision"] == "fp32"
    assert report["machine"]["cores"] >= 1 and report["machine"]["description"]


def test_bench_prints_cpu_features_and_a_table(capsys, vit_bundle) -> None:
    code = main(["bench", "-m", str(vit_bundle), "--seconds", "0.05", "--images", "4", "--batch-sizes", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    machine = this_machine()
    assert machine.describe() in out
    assert all(name in CPU_FEATURES for name in machine.features)
    assert "end to end" in out and "of the ceiling" in out and "CPUExecutionProvider" in out


def test_static_graph_is_timed_at_its_own_batch_only(capsys, static_vit_bundle) -> None:
    report = bench_json(capsys, "-m", static_vit_bundle, "--batch-sizes", "1,8,16")
    assert STATIC_BATCH not in (1, 8, 16)  # else the asked sizes could hide that the static one replaced them
    assert [t["batch"] for t in report["model_only"]] == [STATIC_BATCH]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "8,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--images", "0"], "--images"),
        (["--preprocess", "quick"], "--preprocess"),
        (["--photos", "/nonexistent/folder"], "--photos"),
    ],
)
def test_bad_options_give_one_line(capsys, vit_bundle, args, message) -> None:
    code = main(["bench", "-m", str(vit_bundle), *args])
    _, err = capsys.readouterr()
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_photo_folder_without_images_is_refused(capsys, vit_bundle, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("no photos here")
    code = main(["bench", "-m", str(vit_bundle), "--photos", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "no images found in" in err and str(tmp_path) in err
