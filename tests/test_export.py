"""Exporter: fp32 parity with open_clip, lower precisions, checkpoints, atomic writes, static batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipworks.errors import ExportCheckFailed, ModelNotFound, UsageError
from clipworks.export import export_model
from clipworks.export.exporter import FP32_TOLERANCE
from clipworks.models.bundle import load_bundle
from conftest import MODEL_CONFIGS, STATIC_BATCH


@pytest.mark.parametrize("fixture", ["vit_bundle", "rn_bundle"])
def test_export_writes_an_immich_layout_bundle(fixture: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(fixture)
    for rel in (
        "config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "textual/model.onnx",
        "textual/tokenizer.json", "textual/tokenizer_config.json", "textual/special_tokens_map.json",
        "visual/int8/model.onnx", "textual/int8/model.onnx", "clipworks.json",
    ):  # fmt: skip
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "clipworks.json").read_text())
    assert meta["normalized"] is False and meta["batch"] == "dynamic"
    assert meta["dynamic_text_length"] is True
    assert len(meta["source_sha256"]) == 64
    assert meta["checks"]["fp32"]["visual_max_abs_diff"] <= FP32_TOLERANCE
    assert meta["checks"]["fp32"]["textual_max_abs_diff"] <= FP32_TOLERANCE
    assert meta["checks"]["int8"]["visual_min_cosine"] >= meta["checks"]["int8"]["floor"]
    pre = json.loads((root / "visual" / "preprocess_cfg.json").read_text())
    assert pre["size"] == [64, 64] and pre["interpolation"] == "bicubic" and pre["resize_mode"] == "shortest"
    assert json.loads((root / "textual" / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"


def test_fp16_bundle_is_checked(vit_bundle: Path) -> None:
    checks = json.loads((vit_bundle / "clipworks.json").read_text())["checks"]
    assert checks["fp16"]["visual_min_cosine"] >= 0.999
    assert checks["fp16"]["textual_min_cosine"] >= 0.999
    assert load_bundle(vit_bundle).available_precisions("visual") == ["fp32", "fp16", "int8"]


def test_logit_scale_and_checksum_come_from_the_source(vit_bundle: Path, source_model) -> None:
    src = source_model("tiny-vit")
    meta = load_bundle(vit_bundle).meta
    assert meta.logit_scale == pytest.approx(src.logit_scale)
    assert meta.source_sha256 == src.source_sha256


def test_failed_check_is_an_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clipworks.export.exporter.FP32_TOLERANCE", 0.0)
    out = tmp_path / "bundle"
    with pytest.raises(ExportCheckFailed, match="differs from open_clip"):
        export_model(str(MODEL_CONFIGS / "tiny-vit.json"), out, pretrained="random", log=lambda _: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder left behind


def test_failed_reexport_keeps_the_old_bundle(
    vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(vit_bundle, out)
    before = (out / "visual" / "model.onnx").read_bytes()
    monkeypatch.setattr("clipworks.export.exporter.FP32_TOLERANCE", 0.0)
    with pytest.raises(ExportCheckFailed):
        export_model(str(MODEL_CONFIGS / "tiny-vit.json"), out, pretrained="random", seed=1, log=lambda _: None)
    assert (out / "visual" / "model.onnx").read_bytes() == before


@pytest.mark.parametrize(
    ("model", "pretrained", "precisions", "error", "message"),
    [
        ("ViT-Q-99", "random", ("fp32",), ModelNotFound, "no architecture"),
        ("ViT-B-32", "not-a-tag", ("fp32",), ModelNotFound, "no pretrained tag"),
        ("ViT-B-32", "/nonexistent/CLIP-custom.pth", ("fp32",), ModelNotFound, "does not exist"),
        ("ViT-B-32", "random", ("fp8",), UsageError, "unknown precision"),
    ],
)
def test_bad_export_arguments(tmp_path: Path, model, pretrained, precisions, error, message) -> None:
    with pytest.raises(error, match=message):
        export_model(model, tmp_path / "x", pretrained=pretrained, precisions=precisions, log=lambda _: None)


def test_export_loads_an_open_clip_checkpoint_file(tmp_path: Path, source_model) -> None:
    """open_clip's layout is loaded into the model the config builds: the very model (weights and all) whose
    export ``vit_bundle`` checks, so loading it is what this format adds. An OpenAI-format file, which open_clip
    rebuilds from the state dict, is exported end to end by the command (test_cli)."""
    import torch

    from clipworks.export.source import load_source_model

    src = source_model("tiny-vit")
    torch.save({"state_dict": src.model.state_dict()}, tmp_path / "openclip.pt")
    loaded = load_source_model(str(MODEL_CONFIGS / "tiny-vit.json"), str(tmp_path / "openclip.pt"))
    assert (loaded.pretrained, loaded.source_sha256) == ("openclip", src.source_sha256)
    assert type(loaded.model) is type(src.model)


def test_static_batch_export_runs_through_the_runtime(static_vit_bundle: Path, vit_bundle: Path, photos) -> None:
    import clipworks

    static = clipworks.load(static_vit_bundle)
    dynamic = clipworks.load(vit_bundle)
    assert static.visual.static_batch == STATIC_BATCH == 4
    images = photos[:5]  # 5 rows through a batch-4 graph: one full chunk and one padded chunk
    np.testing.assert_allclose(static.encode_images(images), dynamic.encode_images(images), atol=1e-5)
    texts = ["a dog", "a photo of a cat on a sofa", "", "x", "fruit"]
    np.testing.assert_allclose(static.encode_texts(texts), dynamic.encode_texts(texts), atol=1e-5)


def test_clip_bundles_record_their_family_and_no_bias(vit_bundle: Path) -> None:
    meta = load_bundle(vit_bundle).meta
    assert meta.family == "clip" and meta.logit_bias is None


CLIP_ROW = [49406, 320, 1929, 49407]


@pytest.mark.parametrize(
    ("ours", "theirs", "fails"),
    [
        pytest.param([CLIP_ROW], [[*CLIP_ROW, 0, 0]], False, id="cut-to-longest-then-padding"),
        pytest.param([[*CLIP_ROW, 0, 0]], [[*CLIP_ROW, 0, 0]], False, id="full-rows"),
        pytest.param([[49406, 320, 1930, 49407]], [[*CLIP_ROW, 0, 0]], True, id="another-id"),
        pytest.param([[*CLIP_ROW, 7, 7]], [[*CLIP_ROW, 0, 0]], True, id="other-padding"),
        pytest.param([[0, 0, *CLIP_ROW]], [[*CLIP_ROW, 0, 0]], True, id="padded-on-the-other-side"),
    ],
)
def test_the_bundles_tokenizer_must_give_open_clips_ids(ours, theirs, fails) -> None:
    """The export check compares token ids first: embeddings of other tokens would prove nothing."""
    from clipworks.export.exporter import _check_tokens, _CheckInputs

    inputs = _CheckInputs(np.zeros((1, 3, 2, 2), np.float32), ["a dog"], np.array(theirs), np.array(ours))
    if fails:
        with pytest.raises(ExportCheckFailed, match="other token ids than open_clip for 'a dog'"):
            _check_tokens(inputs, 0, "clip")
    else:
        _check_tokens(inputs, 0, "clip")
