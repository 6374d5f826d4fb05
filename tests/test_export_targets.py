"""export --target: each NPU compiler's graph rules, its calibration pack read back in its own format, parity with
the dynamic graph in ONNX Runtime, and the user errors (unknown target, empty or broken photo folders)."""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from clipworks.cli.main import main
from clipworks.export.targets import ALWAYS_FORBIDDEN, TARGETS
from clipworks.imaging import PreprocessConfig, load_image, preprocess
from clipworks.models.bundle import load_bundle
from clipworks.models.family import family_for_config
from clipworks.ops import l2_normalize
from conftest import MODEL_CONFIGS

CALIB_SIZE = 4  # photos and prompts in each pack: enough to read every format back, cheap to write
PROMPTS = ["a photo of a red bicycle", "two dogs on a beach", "# a comment line, skipped", "", "a bowl of ramen"]
CASES = [(model, target) for model in ("tiny-vit", "tiny-rn") for target in TARGETS]
IDS = [f"{m}-{t}" for m, t in CASES]


@pytest.fixture(scope="session")
def calib_inputs(tmp_path_factory, photos) -> tuple[Path, Path]:
    """The user's own photos (a folder of 4) and prompt file, as --calib-images and --calib-texts take them."""
    root = tmp_path_factory.mktemp("calib")
    folder = root / "my photos"
    folder.mkdir()
    for photo in photos[:CALIB_SIZE]:
        shutil.copy(photo, folder / photo.name)
    texts = root / "prompts.txt"
    texts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return folder, texts


@pytest.fixture(scope="session")
def exported(tmp_path_factory, calib_inputs):
    """``exported(model, target)``: the bundle of that export, made once per session."""
    from clipworks.export import export_model
    from clipworks.pipeline import collect_image_files

    folder, texts = calib_inputs
    made: dict[tuple[str, str], Path] = {}

    def get(model: str, target: str) -> Path:
        if (model, target) not in made:
            out = tmp_path_factory.mktemp("targets") / f"{model}-{target}"
            export_model(
                str(MODEL_CONFIGS / f"{model}.json"), out, pretrained="random", precisions=("fp32",), target=target,
                calib_images=collect_image_files([folder]), calib_size=CALIB_SIZE, calib_texts=texts,
                log=lambda _: None,
            )  # fmt: skip
            made[model, target] = out
        return made[model, target]

    return get


def _dims(value) -> list:  # type: ignore[no-untyped-def]
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize(("model", "target"), CASES, ids=IDS)
def test_graphs_keep_the_targets_rules(exported, model: str, target: str) -> None:
    bundle = exported(model, target)
    rules = TARGETS[target]
    recorded = json.loads((bundle / target / "target.json").read_text())
    assert recorded["opset"] == rules.opset and recorded["batch"] == 1
    assert json.loads((bundle / "clipworks.json").read_text())["target"] == target
    for tower, shape, dtype in (("visual", [1, 3, 64, 64], onnx.TensorProto.FLOAT),
                                ("textual", [1, 77], onnx.TensorProto.INT32)):  # fmt: skip
        path = bundle / tower / "model.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path))
        assert {(o.domain or "ai.onnx", o.version) for o in graph.opset_import} == {("ai.onnx", rules.opset)}
        if rules.max_ir_version is not None:
            assert graph.ir_version <= rules.max_ir_version
        (inp,), (out,) = graph.graph.input, graph.graph.output
        assert _dims(inp) == shape and inp.type.tensor_type.elem_type == dtype
        assert _dims(out) == [1, 32] and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        ops = {n.op_type for n in graph.graph.node}
        assert not ops & (ALWAYS_FORBIDDEN | rules.forbidden_ops), ops
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
        assert "MatMul" in ops and "Softmax" in ops  # attention spelt out, not fused
        assert not any(n.op_type in ("Shape", "Identity") for n in graph.graph.node)  # shapes folded


def _ort(path: Path, feed: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


@pytest.mark.parametrize(("model", "target"), CASES, ids=IDS)
def test_static_graphs_match_the_dynamic_ones(exported, vit_bundle, rn_bundle, photos, model, target) -> None:
    static = load_bundle(exported(model, target))
    dynamic = load_bundle(vit_bundle if model == "tiny-vit" else rn_bundle)  # same config, same seed: same weights
    assert static.meta.source_sha256 == dynamic.meta.source_sha256
    cfg = PreprocessConfig.from_dict(static.preprocess_cfg)
    tokenizer = family_for_config(static.config).tokenizer(static)
    for i, photo in enumerate(photos[:3]):  # one row at a time: the static batch is 1
        pixels = preprocess(load_image(photo), cfg)[None]
        ids = tokenizer.encode([PROMPTS[i]], pad_to=77).astype(np.int32)
        for tower, feed in (("visual", pixels), ("textual", ids)):
            ours = _ort(static.graph(tower, "fp32"), feed)
            theirs = _ort(dynamic.graph(tower, "fp32"), feed)
            assert np.abs(l2_normalize(ours) - l2_normalize(theirs)).max() <= 1e-4, (tower, photo)


def test_compare_bundles_checks_against_a_dynamic_bundle(exported, vit_bundle, rn_bundle) -> None:
    from clipworks.errors import UsageError
    from clipworks.export.exporter import compare_bundles

    result = compare_bundles(exported("tiny-vit", "axera"), vit_bundle)
    assert max(result.values()) <= 1e-4
    with pytest.raises(UsageError, match="other weights"):
        compare_bundles(exported("tiny-vit", "axera"), rn_bundle)


def _expected(bundle: Path, calib_inputs) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    from clipworks.pipeline import collect_image_files

    b = load_bundle(bundle)
    cfg = PreprocessConfig.from_dict(b.preprocess_cfg)
    pixels = np.stack([preprocess(load_image(p), cfg) for p in collect_image_files([calib_inputs[0]])])
    prompts = [p for p in PROMPTS if p and not p.startswith("#")]
    prompts = [prompts[i % len(prompts)] for i in range(min(CALIB_SIZE, len(prompts)))]
    ids = family_for_config(b.config).tokenizer(b).encode(prompts, pad_to=77).astype(np.int32)
    return pixels, ids


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-rn"])
def test_pulsar2_pack_is_a_tar_of_npy_with_its_config(exported, calib_inputs, model) -> None:
    bundle = exported(model, "axera")
    pixels, ids = _expected(bundle, calib_inputs)
    folder = bundle / "axera"
    for tower, want, name, dtype in (("visual", pixels, "image", "FP32"), ("textual", ids, "text", "S32")):
        config = json.loads((folder / f"pulsar2_{tower}.json").read_text())
        (quant,) = config["quant"]["input_configs"]
        assert quant["tensor_name"] == name and quant["calibration_format"] == "Numpy"
        with tarfile.open(folder / quant["calibration_dataset"]) as tar:
            members = sorted(tar.getmembers(), key=lambda m: m.name)
            samples = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in members]  # type: ignore[union-attr]
        assert quant["calibration_size"] == len(samples) == len(want)
        assert np.array_equal(np.concatenate(samples), want)
        assert samples[0].shape == ((1, 3, 64, 64) if tower == "visual" else (1, 77))
        assert config["input_processors"][0]["src_dtype"] == dtype
    assert "pulsar2 build --input ../visual/model.onnx" in (folder / "COMPILE.md").read_text()


def test_rknn_pack_is_a_dataset_txt_of_npy_paths(exported, calib_inputs) -> None:
    bundle = exported("tiny-vit", "rknn")
    pixels, ids = _expected(bundle, calib_inputs)
    folder = bundle / "rknn"
    for tower, want in (("visual", pixels.transpose(0, 2, 3, 1)), ("textual", ids)):
        lines = (folder / f"dataset_{tower}.txt").read_text().split()
        samples = [np.load(folder / line) for line in lines]
        assert np.array_equal(np.concatenate(samples), want)  # image samples NHWC, as RKNN reads numpy
    script = (folder / "rknn_build.py").read_text()
    ast.parse(script)
    assert "dataset='dataset_visual.txt'" in script and "'../textual/model.onnx'" in script


def test_tpu_mlir_pack_is_npz_keyed_by_input_name(exported, calib_inputs) -> None:
    bundle = exported("tiny-rn", "sophgo")
    pixels, ids = _expected(bundle, calib_inputs)
    for tower, want, name in (("visual", pixels, "image"), ("textual", ids, "text")):
        files = sorted((bundle / "sophgo" / "calibration" / tower).glob("*.npz"))
        loaded = [np.load(f) for f in files]
        assert all(list(x.keys()) == [name] for x in loaded)
        assert np.array_equal(np.concatenate([x[name] for x in loaded]), want)
    steps = (bundle / "sophgo" / "COMPILE.md").read_text()
    assert "--input_shapes [[1,3,64,64]]" in steps and f"--input_num {len(pixels)}" in steps and "bmrt_test" in steps


def test_hailo_pack_is_one_nhwc_npy_and_the_text_tower_stays_on_the_host(exported, calib_inputs) -> None:
    bundle = exported("tiny-vit", "hailo")
    pixels, _ = _expected(bundle, calib_inputs)
    calib = np.load(bundle / "hailo" / "calibration" / "visual.npy")
    assert calib.dtype == np.float32 and np.array_equal(calib, pixels.transpose(0, 2, 3, 1))
    assert not (bundle / "hailo" / "calibration" / "textual.npy").exists()
    assert "--calib-set-path calibration/visual.npy" in (bundle / "hailo" / "COMPILE.md").read_text()


def test_horizon_pack_is_raw_float32_files_named_in_its_yaml(exported, calib_inputs) -> None:
    import yaml

    bundle = exported("tiny-rn", "horizon")
    pixels, _ = _expected(bundle, calib_inputs)
    config = yaml.safe_load((bundle / "horizon" / "horizon_visual.yaml").read_text())
    assert config["input_parameters"]["input_shape"] == "1x3x64x64"
    assert config["calibration_parameters"]["cal_data_type"] == "float32"
    files = sorted((bundle / "horizon" / config["calibration_parameters"]["cal_data_dir"]).iterdir())
    samples = [np.fromfile(f, dtype=np.float32).reshape(1, 3, 64, 64) for f in files]
    assert np.array_equal(np.concatenate(samples), pixels)
    assert (bundle / "horizon" / config["model_parameters"]["onnx_model"]).is_file()


def test_tensorrt_writes_commands_only(exported) -> None:
    folder = exported("tiny-vit", "tensorrt") / "tensorrt"
    assert not (folder / "calibration").exists()
    commands = re.findall(r"--onnx=(\S+)", (folder / "COMPILE.md").read_text())
    assert commands and all((folder / c).is_file() for c in commands)


def test_default_prompts_are_real_class_names(source_model) -> None:
    from clipworks.export.calibration import read_calibration_set

    src = source_model("tiny-vit")
    photos = sorted((MODEL_CONFIGS.parents[1] / "src" / "clipworks" / "data" / "check_images").glob("*.jpg"))
    cal = read_calibration_set(src.preprocess_cfg, images=photos, images_source="x", size=8, log=lambda _: None)
    assert len(cal.prompts) == 8 and len(set(cal.prompts)) == 8
    assert all(p.strip() and "{}" not in p for p in cal.prompts) and "tench" in cal.prompts[0]


def test_bench_times_a_target_bundle_at_its_own_batch(exported) -> None:
    from clipworks.bench import time_model
    from clipworks.runtime.encoder import load

    timings = time_model(load(exported("tiny-vit", "sophgo")), (1, 8, 16, 32), seconds=0.01)
    assert [t.batch for t in timings] == [1]


def _one_error_line(err: str, *named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in named), err


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        pytest.param(["--target", "coral"], ["coral", *TARGETS], id="unknown-target"),
        pytest.param(["--target", "axera", "--calib-size", "0"], ["--calib-size"], id="calib-size-0"),
        pytest.param(["--target", "rknn", "--calib-images", "{empty}"], ["no images", "empty"], id="empty-folder"),
        pytest.param(["--target", "axera", "--precision", "int8"], ["--precision"], id="int8-with-target"),
        pytest.param(["--calib-texts", "{tmp}/p.txt"], ["--target"], id="texts-without-target"),
    ],
)  # fmt: skip
def test_user_errors_before_any_export_are_one_line(capsys, tmp_path, extra, named) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, empty=tmp_path / "empty") for a in extra]
    code = main(
        ["export", str(MODEL_CONFIGS / "tiny-vit.json"), "--pretrained", "random", "-o", str(tmp_path / "o"), *args]
    )
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err, *named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("files", "texts", "named"),
    [
        pytest.param({"a.jpg": b"not a jpeg", "b.png": b"\x89PNG\r\n broken"}, None, ["none of the 2"], id="corrupt"),
        pytest.param({"a.jpg": None}, "", ["no labels", "p.txt"], id="empty-prompt-file"),
    ],
)
def test_broken_calibration_inputs_fail_in_one_line_with_nothing_written(capsys, tmp_path, photos, files, texts, named):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in files.items():
        if data is None:
            shutil.copy(photos[0], folder / name)
        else:
            (folder / name).write_bytes(data)
    extra = []
    if texts is not None:
        (tmp_path / "p.txt").write_text(texts)
        extra = ["--calib-texts", str(tmp_path / "p.txt")]
    code = main(["export", str(MODEL_CONFIGS / "tiny-rn.json"), "--pretrained", "random", "-o", str(tmp_path / "o"),
                 "--target", "sophgo", "--calib-images", str(folder), *extra])  # fmt: skip
    _, err = capsys.readouterr()
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in named), err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
