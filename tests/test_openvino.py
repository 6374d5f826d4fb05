"""``--device openvino``: OpenVINO's own runtime behind the same ``Backend`` seam, real sessions on this CPU.

Parity with ONNX Runtime (fp32 exactly, static int8 to its export floor), vectors that do not depend on the
batch, bf16 where the CPU has bf16 units (and a one-line refusal where it has not), what ``auto`` picks by the
CPU's features, and the refusals that name what to do.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipworks
from clipworks.cli.main import main
from clipworks.errors import BadBundle, UsageError
from clipworks.export.precision import COSINE_FLOORS
from clipworks.machine import Machine, this_machine
from clipworks.runtime.sessions import CpuBackend, OpenVINOBackend, RuntimeSettings, open_backend
from conftest import _export

PROMPTS = ["a photo of a dog", "", "a close-up photo of a butterfly on a flower", "word " * 100]


@pytest.fixture(scope="module")
def fused_static_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT with fused attention (ORT's MultiHeadAttention contrib op) and static int8, as
    ``export --fuse-attention --precision int8-static`` writes it, calibrated on the shipped photos."""
    return _export(tmp_path_factory, "tiny-vit", ("fp32", "int8", "int8-static"), fuse_attention=True)


def _machine(*features: str) -> Machine:
    return Machine("test CPU", features, 2, 8.0, "3.11")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_matches_onnx_runtime(vit_bundle: Path, photos: list[Path]) -> None:
    ours = clipworks.load(vit_bundle, device="openvino", precision="fp32")
    ort = clipworks.load(vit_bundle, device="cpu", precision="fp32")
    assert ours.providers == ["OpenVINO:CPU"] and ort.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(ours.encode_images(photos[:5]), ort.encode_images(photos[:5]), atol=1e-5)
    np.testing.assert_allclose(ours.encode_texts(PROMPTS), ort.encode_texts(PROMPTS), atol=1e-5)
    # The CPU plugin would run fp32 graphs in bf16 on an AMX CPU unless told: fp32 must be asked for.
    assert ours.visual.applied_options()["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"


def test_fused_attention_graphs_run_on_openvino(fused_static_bundle: Path, photos: list[Path]) -> None:
    """OpenVINO reads ORT's MultiHeadAttention contrib op, so a --fuse-attention bundle is not ORT-only."""
    ours = clipworks.load(fused_static_bundle, device="openvino", precision="fp32")
    ort = clipworks.load(fused_static_bundle, device="cpu", precision="fp32")
    np.testing.assert_allclose(ours.encode_images(photos[:3]), ort.encode_images(photos[:3]), atol=1e-5)
    np.testing.assert_allclose(ours.encode_texts(PROMPTS), ort.encode_texts(PROMPTS), atol=1e-5)


def test_static_int8_keeps_its_floor_and_does_not_depend_on_the_batch(
    fused_static_bundle: Path, photos: list[Path]
) -> None:
    ours = clipworks.load(fused_static_bundle, device="openvino", precision="int8-static")
    fp32 = clipworks.load(fused_static_bundle, device="cpu", precision="fp32")
    batch = ours.encode_images(photos[:5])
    assert _cosines(batch, fp32.encode_images(photos[:5])).min() >= COSINE_FLOORS["int8-static"]
    assert _cosines(ours.encode_texts(PROMPTS), fp32.encode_texts(PROMPTS)).min() >= COSINE_FLOORS["int8-static"]
    alone = np.concatenate([ours.encode_images([photo]) for photo in photos[:5]])
    np.testing.assert_allclose(alone, batch, atol=1e-6)  # fixed scales: a photo's vector ignores its batch-mates


def test_bf16_runs_where_the_cpu_has_bf16_units(vit_bundle: Path, photos: list[Path]) -> None:
    machine = this_machine()
    if not machine.has_bf16_matmul:
        with pytest.raises(UsageError, match=r"bf16 needs a CPU with AMX-BF16 or AVX512-BF16") as refused:
            clipworks.load(vit_bundle, device="openvino", precision="bf16")
        assert refused.value.setting == "precision" and "\n" not in str(refused.value)
        return
    ours = clipworks.load(vit_bundle, device="openvino", precision="bf16")
    fp32 = clipworks.load(vit_bundle, device="cpu", precision="fp32")
    assert ours.graph("visual") == fp32.graph("visual")  # bf16 is computed from the fp32 graph
    assert ours.visual.applied_options()["compiled"]["INFERENCE_PRECISION_HINT"] == "bf16"
    batch = ours.encode_images(photos[:5])
    exact = fp32.encode_images(photos[:5])
    assert _cosines(batch, exact).min() >= 0.999
    assert np.abs(batch - exact).max() > 0  # really bf16, not fp32 under another name
    alone = np.concatenate([ours.encode_images([photo]) for photo in photos[:5]])
    np.testing.assert_allclose(alone, batch, atol=1e-6)


def test_onnx_runtime_refuses_bf16_naming_the_backend_that_runs_it(vit_bundle: Path) -> None:
    with pytest.raises(UsageError, match=r"precision bf16 on device cpu: bf16 runs on --device openvino") as refused:
        clipworks.load(vit_bundle, device="cpu", precision="bf16")
    assert refused.value.setting == "precision"


def test_dynamic_int8_is_refused_on_openvino_and_auto_runs_it_on_onnx_runtime(vit_bundle: Path) -> None:
    with pytest.raises(UsageError, match=r"dynamic int8 runs about 4x slower on OpenVINO.*int8-static"):
        clipworks.load(vit_bundle, device="openvino", precision="int8")
    model = clipworks.load(vit_bundle, precision="int8")  # device auto: never a backend that refuses int8
    assert isinstance(model.backend, CpuBackend) and model.precision == "int8"


# features -> the backend ``auto`` opens (openvino is installed in the test environment)
AUTO_DEVICE = [
    pytest.param(("AVX2", "AVX-512", "VNNI", "AMX-INT8", "AMX-BF16"), OpenVINOBackend, id="amx-openvino"),
    pytest.param(("AVX2", "AMX-BF16"), OpenVINOBackend, id="amx-bf16-openvino"),
    pytest.param(("AVX2", "AVX-512", "VNNI", "AVX512-BF16"), OpenVINOBackend, id="vnni-openvino"),
    pytest.param(("AVX2", "AVX-VNNI"), CpuBackend, id="avx-vnni-not-measured"),
    pytest.param(("AVX2",), CpuBackend, id="avx2-cpu"),
]


@pytest.mark.parametrize(("features", "expected"), AUTO_DEVICE)
def test_auto_takes_openvino_only_where_it_measured_faster(features: tuple[str, ...], expected: type) -> None:
    machine = _machine(*features)
    assert type(open_backend("auto", machine=machine)) is expected
    # and never one that refuses the work (the model's precision): then ONNX Runtime's CPU provider
    assert type(open_backend("auto", machine=machine, usable=lambda cls: cls is not OpenVINOBackend)) is CpuBackend


def test_explicit_bf16_with_device_auto_goes_to_openvino_where_it_runs(vit_bundle: Path) -> None:
    machine = this_machine()
    if OpenVINOBackend.wanted_by_auto(machine) and machine.has_bf16_matmul:
        assert clipworks.load(vit_bundle, precision="bf16").providers == ["OpenVINO:CPU"]
    else:  # auto ends on ONNX Runtime's CPU provider, which names the device that runs bf16
        with pytest.raises(UsageError, match=r"bf16 runs on --device openvino"):
            clipworks.load(vit_bundle, precision="bf16")


def test_auto_on_this_machine_follows_its_features(vit_bundle: Path, fused_static_bundle: Path) -> None:
    machine = this_machine()
    model = clipworks.load(fused_static_bundle)
    if OpenVINOBackend.wanted_by_auto(machine):
        assert model.providers == ["OpenVINO:CPU"] and model.precision == "int8-static"
    else:
        assert model.providers == ["CPUExecutionProvider"]
    # Without a static int8 graph auto stays fp32 on ONNX Runtime: OpenVINO's fp32 is no faster, and bf16 is
    # opt-in because it moves vectors that may be someone else's to match.
    plain = clipworks.load(vit_bundle)
    assert (plain.providers, plain.precision) == (["CPUExecutionProvider"], "fp32")


def test_compile_properties_follow_the_settings() -> None:
    alone = OpenVINOBackend(RuntimeSettings(threads=3, cache_dir=Path("/c"))).compile_config("int8-static")
    assert alone == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": 3,
        "ENABLE_CPU_PINNING": True,
        "CACHE_DIR": "/c",
    }
    beside_decoders = OpenVINOBackend(RuntimeSettings(allow_spinning=False, precision_hint="bf16"))
    config = beside_decoders.compile_config("fp32")
    assert config["ENABLE_CPU_PINNING"] is False and config["INFERENCE_PRECISION_HINT"] == "bf16"
    gpu = OpenVINOBackend(RuntimeSettings(cache_dir=Path("/engines")), "GPU").compile_config("fp16")
    assert gpu == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f16", "CACHE_DIR": "/engines"}


def test_compiled_graphs_are_cached_and_a_bad_cache_costs_only_the_compile(vit_bundle: Path, tmp_path: Path) -> None:
    graph = vit_bundle / "visual" / "model.onnx"
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)  # the tiny ViT's size
    cache = tmp_path / "engines"
    first = OpenVINOBackend(RuntimeSettings(cache_dir=cache)).open_session(graph, "fp32")
    want = first.run(pixels)
    blobs = list(cache.glob("*.blob"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 0  # kept for the next start
    again = OpenVINOBackend(RuntimeSettings(cache_dir=cache)).open_session(graph, "fp32")
    np.testing.assert_array_equal(again.run(pixels), want)
    blobs[0].write_bytes(b"not a compiled model")  # a corrupt blob: compiled afresh, the same vectors
    np.testing.assert_array_equal(
        OpenVINOBackend(RuntimeSettings(cache_dir=cache)).open_session(graph, "fp32").run(pixels), want
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache folder cannot be made: no cache, the graph still runs
    session = OpenVINOBackend(RuntimeSettings(cache_dir=blocked / "engines")).open_session(graph, "fp32")
    assert "CACHE_DIR" not in session.config
    np.testing.assert_array_equal(session.run(pixels), want)


def test_the_pipeline_unpins_openvinos_threads(vit_bundle: Path) -> None:
    model = clipworks.load(vit_bundle, device="openvino", precision="fp32")
    model.share_cores_with_decoders()
    assert model.visual.applied_options()["compiled"]["ENABLE_CPU_PINNING"] == "False"


def test_concurrent_callers_get_their_own_requests(vit_bundle: Path, photos: list[Path]) -> None:
    model = clipworks.load(vit_bundle, device="openvino", precision="fp32")
    expected = [model.encode_images(photos[i : i + 2]) for i in range(4)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = model.encode_images(photos[i : i + 2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        np.testing.assert_array_equal(got[i], expected[i])


def test_a_graph_openvino_cannot_read_is_one_line(vit_bundle: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(vit_bundle, root)
    (root / "visual" / "model.onnx").write_bytes(b"half a graph")
    model = clipworks.load(root, device="openvino", precision="fp32")
    with pytest.raises(BadBundle, match=r"visual/model\.onnx could not be compiled by OpenVINO for CPU") as caught:
        model.encode_images([Image.new("RGB", (64, 64))])
    assert "\n" not in str(caught.value) and "--device cpu" in str(caught.value)


def test_without_the_package_the_device_says_what_to_install(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(UsageError, match=r"device 'openvino' needs the openvino package: pip install"):
        clipworks.load(vit_bundle, device="openvino")
    assert isinstance(clipworks.load(vit_bundle).backend, CpuBackend)  # auto carries on without it


def test_models_info_reports_what_openvino_compiled(vit_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["models", "info", str(vit_bundle), "--device", "openvino", "--precision", "fp32", "--json"]) == 0
    runtime = json.loads(capsys.readouterr().out)["runtime"]
    assert runtime["backend"] == "openvino" and runtime["providers"] == ["OpenVINO:CPU"]
    assert runtime["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"
