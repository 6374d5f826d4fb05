"""The faster graph: fused attention, static int8 calibrated on photos, and ``--precision auto``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from clipworks.cli.main import main
from clipworks.errors import BadImage
from clipworks.export import export_model
from clipworks.export.optimize import FUSED_OP, count_ops, fuse_attention
from clipworks.export.precision import COSINE_FLOORS, calibration_pixels
from clipworks.machine import Machine
from clipworks.models.bundle import BundleMeta, graph_relpath, load_bundle, write_json
from clipworks.runtime.encoder import resolve_precision
from clipworks.runtime.sessions import BACKENDS, CpuBackend, OrtSession
from conftest import MODEL_CONFIGS

TINY_LAYERS = 2  # tests/model_configs/tiny-vit.json: two blocks in each tower

# One row per class of file a user's photo folder may hold that is not a readable photo.
BAD_PHOTOS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"this is not an image\n", id="text-named-jpg"),
    pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", id="truncated-jpeg"),
]


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    """A user's folder: real photos and one file that is not a photo."""
    folder = tmp_path_factory.mktemp("my-photos")
    for photo in photos[:4]:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def fast_export(tmp_path_factory: pytest.TempPathFactory, calib_folder: Path) -> tuple[Path, list[str]]:
    """The tiny ViT exported with the graph pass, dynamic and static int8 calibrated on ``calib_folder``."""
    out = tmp_path_factory.mktemp("fast") / "tiny-vit"
    messages: list[str] = []
    export_model(
        str(MODEL_CONFIGS / "tiny-vit.json"), out, pretrained="random", precisions=("fp32", "int8", "int8-static"),
        calib_images=sorted(calib_folder.iterdir()), fuse_attention=True, log=messages.append,
    )  # fmt: skip
    return out, messages


@pytest.mark.parametrize("tower", ["visual", "textual"])
def test_every_attention_block_is_fused(fast_export: tuple[Path, list[str]], tower: str) -> None:
    root, _ = fast_export
    graph = root / graph_relpath(tower, "fp32")  # type: ignore[arg-type]
    assert count_ops(graph, FUSED_OP) == TINY_LAYERS
    assert count_ops(graph, "Softmax") == 0  # no unfused block left behind
    assert count_ops(graph, "Transpose") <= 1  # only the patch embedding's layout transpose remains
    recorded = load_bundle(root).meta.checks["graph"][tower]
    assert recorded["fused_attention"] == recorded["attention_blocks"] == TINY_LAYERS
    assert recorded["transposes_before"] > 10 * max(recorded["transposes_after"], 1)


def test_fused_graph_matches_open_clip(fast_export: tuple[Path, list[str]], source_model, photos) -> None:
    """Parity with open_clip to 1e-4 on normalised embeddings, measured here, not only by the exporter."""
    import open_clip
    import torch
    from PIL import Image

    root, _ = fast_export
    src = source_model("tiny-vit")
    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"])
    pixels = np.stack([transform(Image.open(p)).numpy() for p in photos])
    with torch.no_grad():
        reference = src.model.encode_image(torch.from_numpy(pixels)).numpy()
    got = OrtSession(root / "visual" / "model.onnx", CpuBackend()).run(pixels)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    assert np.abs(unit(reference) - unit(got)).max() <= 1e-4
    assert load_bundle(root).meta.checks["fp32"]["visual_max_abs_diff"] <= 1e-4


def test_static_int8_is_quantised_and_meets_its_floor(fast_export: tuple[Path, list[str]]) -> None:
    root, messages = fast_export
    check = load_bundle(root).meta.checks["int8-static"]
    assert check["floor"] == COSINE_FLOORS["int8-static"]
    assert min(check["visual_min_cosine"], check["textual_min_cosine"]) >= check["floor"]
    graph = onnx.load(str(root / graph_relpath("visual", "int8-static")))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, with scales fixed at export
    assert "DynamicQuantizeLinear" not in ops
    assert "calibrating int8-static on 4 photos" in messages


def test_calibration_from_a_user_folder_skips_the_bad_photo(fast_export: tuple[Path, list[str]]) -> None:
    _, messages = fast_export
    warnings = [m for m in messages if m.startswith("warning: calibration photo skipped")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]


@pytest.mark.parametrize("content", BAD_PHOTOS)
def test_each_bad_photo_class_is_skipped_with_a_warning(tmp_path: Path, photos: list[Path], content: bytes) -> None:
    shutil.copy(photos[0], tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(content)
    messages: list[str] = []
    cfg = {"size": [64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}
    pixels = calibration_pixels(sorted(tmp_path.iterdir()), cfg, log=messages.append)
    assert pixels.shape == (1, 3, 64, 64)
    assert len(messages) == 1 and "bad.jpg" in messages[0]
    with pytest.raises(BadImage, match="none of the 1 calibration photos"):
        calibration_pixels([tmp_path / "bad.jpg"], cfg, log=messages.append)


def test_calibration_photos_are_bounded(photos: list[Path]) -> None:
    cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert calibration_pixels(photos * 4, cfg, limit=5, log=lambda _: None).shape[0] == 5


def test_default_export_keeps_the_plain_graph(vit_bundle: Path) -> None:
    """Without ``fuse_attention``: no contrib ops, for runtimes other than ONNX Runtime; still checked.

    ``vit_bundle`` is this config exported with the defaults (its fp32 graph is what a default export writes)."""
    out = vit_bundle
    for tower in ("visual", "textual"):
        graph = onnx.load(str(out / graph_relpath(tower, "fp32")))  # type: ignore[arg-type]
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
        assert count_ops(out / graph_relpath(tower, "fp32"), "Softmax") == TINY_LAYERS  # type: ignore[arg-type]
    checks = load_bundle(out).meta.checks
    assert "graph" not in checks and checks["fp32"]["visual_max_abs_diff"] <= 1e-4


def test_fusing_twice_finds_nothing_more(fast_export: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A graph the pass cannot match (here: one it already fused) is written back unchanged in meaning."""
    root, _ = fast_export
    report = fuse_attention(root / "visual" / "model.onnx", tmp_path / "again.onnx", num_heads=2)
    assert (report.attention_blocks, report.fused) == (0, 0)
    assert count_ops(tmp_path / "again.onnx", FUSED_OP) == TINY_LAYERS


def test_calib_images_without_static_int8_is_a_usage_error(capsys, calib_folder: Path, tmp_path: Path) -> None:
    args = ["export", str(MODEL_CONFIGS / "tiny-vit.json"), "--pretrained", "random", "-o", str(tmp_path / "b"),
            "--precision", "fp32,int8", "--calib-images", str(calib_folder)]  # fmt: skip
    assert main(args) == 2
    _, err = capsys.readouterr()
    assert "int8-static" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def _machine(*features: str) -> Machine:
    return Machine("test CPU", features, 2, 8.0, "3.11")


def _passed(cosine: float) -> dict[str, float]:
    return {"floor": 0.97, "visual_min_cosine": cosine, "textual_min_cosine": cosine}


# features, device, graphs on disk, recorded checks -> what auto picks
# fmt: off
AUTO_TABLE = [
    pytest.param(("AVX2",), "cpu", ("int8", "int8-static"), {"int8": _passed(0.99), "int8-static": _passed(0.99)},
                 "fp32", id="avx2-only-keeps-fp32"),
    pytest.param(("AVX2", "AVX-512", "VNNI"), "cpu", ("int8", "int8-static"),
                 {"int8": _passed(0.99), "int8-static": _passed(0.99)}, "int8-static", id="vnni-static-first"),
    pytest.param(("AVX2", "AMX-INT8"), "cpu", ("int8", "int8-static"), {"int8-static": _passed(0.99)},
                 "int8-static", id="amx-static"),
    # Dynamic int8 moves a photo's vector with its batch-mates: never chosen for the user, checked or not.
    pytest.param(("AVX2", "AMX-INT8"), "cpu", ("int8",), {"int8": _passed(0.99)}, "fp32", id="dynamic-only"),
    pytest.param(("AVX2", "AVX-VNNI"), "cpu", ("int8", "int8-static"),
                 {"int8": _passed(0.99), "int8-static": _passed(0.90)}, "fp32", id="static-under-floor"),
    pytest.param(("VNNI",), "cpu", ("int8",), {}, "fp32", id="no-recorded-check"),
    pytest.param(("VNNI",), "cpu", (), {"int8": _passed(0.99)}, "fp32", id="no-int8-graph"),
    pytest.param(("VNNI",), "cuda", ("fp16", "int8"), {"int8": _passed(0.99)}, "fp16", id="gpu-fp16"),
    pytest.param(("VNNI",), "cuda", ("int8",), {"int8": _passed(0.99)}, "fp32", id="gpu-without-fp16"),
]
# fmt: on


@pytest.mark.parametrize(("features", "device", "graphs", "checks", "expected"), AUTO_TABLE)
def test_auto_precision(tmp_path: Path, features, device, graphs, checks, expected) -> None:
    for precision in ("fp32", *graphs):
        path = tmp_path / graph_relpath("visual", precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # resolve_precision reads which graphs exist, never their contents
    write_json(tmp_path / "config.json", {"embed_dim": 32})
    write_json(tmp_path / "visual" / "preprocess_cfg.json", {"size": [64, 64], "mean": [0] * 3, "std": [1] * 3})
    write_json(tmp_path / "clipworks.json", BundleMeta(checks=checks).to_dict())
    bundle = load_bundle(tmp_path)
    backend = BACKENDS[device]()  # built, not opened: only its fp16 preference is read
    assert resolve_precision(bundle, "auto", backend, _machine(*features)) == expected
    assert resolve_precision(bundle, "fp32", backend, _machine(*features)) == "fp32"  # explicit wins
    assert json.loads((tmp_path / "clipworks.json").read_text())["checks"] == checks
