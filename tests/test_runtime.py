"""ClipModel end to end against open_clip: real photos and prompts in, embeddings out."""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipworks
from clipworks.errors import BadBundle, BadImage, UsageError
from clipworks.models.bundle import Bundle, load_bundle
from clipworks.runtime import sessions
from clipworks.runtime.encoder import ClipModel
from clipworks.runtime.sessions import (
    BACKENDS,
    CoreMLBackend,
    CpuBackend,
    CudaBackend,
    OpenVINOBackend,
    OpenVINOProviderBackend,
    OrtSession,
    RuntimeSettings,
    TensorRTBackend,
    device_names,
    open_backend,
    provider_start_failure,
    register_backend,
)

PROMPTS = [
    "a photo of a dog",
    "",
    "a close-up photo of a colourful butterfly resting on a flower in the garden",
    "Fruit & VEGETABLES &amp; more",
    "😀 emoji",
    "word " * 100,  # longer than the context: truncated, end token kept
]


def _torch_reference(src, photos: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import open_clip
    import torch

    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p)) for p in photos])
        image = src.model.encode_image(pixels, normalize=True).numpy()
        text = src.model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    return image, text


@pytest.mark.parametrize(("fixture", "config"), [("vit_bundle", "tiny-vit"), ("rn_bundle", "tiny-rn")])
def test_fp32_matches_open_clip_end_to_end(fixture, config, request, source_model, photos) -> None:
    """Decode + exact preprocess + ONNX graph vs open_clip's transform + torch model, within 1e-4."""
    model = clipworks.load(request.getfixturevalue(fixture), precision="fp32")
    ref_image, ref_text = _torch_reference(source_model(config), photos, PROMPTS)
    np.testing.assert_allclose(model.encode_images(photos, batch_size=4), ref_image, atol=1e-4)
    np.testing.assert_allclose(model.encode_texts(PROMPTS, batch_size=4), ref_text, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_lower_precisions_stay_close_to_fp32(vit_bundle: Path, photos, precision: str) -> None:
    fp32 = clipworks.load(vit_bundle, precision="fp32")
    low = clipworks.load(vit_bundle, precision=precision)
    assert low.precision == precision
    cosine = np.sum(fp32.encode_images(photos) * low.encode_images(photos), axis=1)
    assert cosine.min() >= (0.999 if precision == "fp16" else 0.97)


def test_every_input_kind_gives_the_same_embedding(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    path = photos[0]
    pil = Image.open(path)
    inputs = [path, str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    out = model.encode_images(inputs)
    np.testing.assert_allclose(out, np.repeat(out[:1], len(inputs), axis=0), atol=1e-6)


def test_outputs_are_normalised_unless_asked(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    norms = np.linalg.norm(model.encode_images(photos[:2]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    raw = model.encode_images(photos[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert model.embed_dim == 32 and model.logit_scale == pytest.approx(1 / 0.07)


def test_text_batches_pad_only_to_the_longest_prompt(vit_bundle: Path) -> None:
    """Results do not depend on how prompts are grouped: one by one equals all at once."""
    model = clipworks.load(vit_bundle)
    together = model.encode_texts(PROMPTS)
    alone = np.concatenate([model.encode_texts([t]) for t in PROMPTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert model.encode_texts([]).shape == (0, 32)


def test_text_encoder_loads_only_when_used(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    assert not model.loaded("visual") and not model.loaded("textual")
    model.encode_images(photos[:1])
    assert model.loaded("visual") and not model.loaded("textual")
    model.encode_texts(["a cat"])
    assert model.loaded("textual")


def test_load_towers_loads_what_it_names_now(vit_bundle: Path) -> None:
    model = clipworks.load(vit_bundle)
    model.load_towers("textual")
    assert model.loaded("textual") and not model.loaded("visual")
    with pytest.raises(UsageError, match="unknown tower 'text': use one of visual, textual"):
        model.load_towers("text")  # type: ignore[arg-type]


def test_towers_load_once_when_threads_race_for_them(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = Bundle.graph

    def counting_graph(self: Bundle, tower: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(tower)
        return real(self, tower, *args, **kwargs)

    monkeypatch.setattr(Bundle, "graph", counting_graph)
    model = clipworks.load(vit_bundle)
    opened.clear()  # ClipModel checks the visual graph exists when made
    start = threading.Barrier(8)
    results: list[np.ndarray] = []

    def encode() -> None:
        start.wait()
        results.append(model.encode_texts(["a photo of a cat"]))
        results.append(model.embed_image_batch(np.zeros((1, 3, 64, 64), np.float32)))

    threads = [threading.Thread(target=encode) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(opened) == ["textual", "visual"]  # one session each, however many threads asked at once
    assert len(results) == 16


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / "visual" / "model.onnx").unlink(), "visual/model.onnx is missing"),
        (lambda root: (root / "config.json").unlink(), "config.json is missing"),
        (lambda root: (root / "config.json").write_text('{"embed_dim": 3'), "not valid JSON"),
        (lambda root: (root / "visual" / "preprocess_cfg.json").write_text("{}"), "has no 'size'"),
        (lambda root: (root / "visual" / "model.onnx").write_bytes(b"half"), "could not be loaded"),
        (lambda root: (root / "textual" / "tokenizer.json").unlink(), "tokenizer.json"),
    ],
)
def test_half_written_bundles_give_clear_errors(vit_bundle: Path, tmp_path: Path, breakage, message) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(vit_bundle, root)
    breakage(root)
    with pytest.raises(BadBundle, match=message):
        model = clipworks.load(root)
        model.encode_images([Image.new("RGB", (64, 64))])
        model.encode_texts(["a"])


def test_missing_precision_names_what_the_bundle_has(rn_bundle: Path) -> None:
    with pytest.raises(BadBundle, match=r"precisions \[fp32, int8\]"):
        clipworks.load(rn_bundle, precision="fp16")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("quantum", r"unknown device 'quantum': use auto, tensorrt, cuda, openvino-ep, coreml, openvino, cpu"),
        ("cuda:0", r"device 'cuda:0' needs CUDAExecutionProvider.*\(installed: cpu, openvino\).*onnxruntime-gpu"),
        ("tensorrt", r"needs TensorrtExecutionProvider"),
        ("openvino-ep:GPU", r"needs OpenVINOExecutionProvider"),
        ("openvino:GPU", r"device openvino:GPU: OpenVINO sees no GPU here \(it has CPU\)"),
        ("coreml", r"needs CoreMLExecutionProvider"),
        ("cpu:1", r"device cpu:1 takes no suffix: use device cpu"),
    ],
)
def test_a_device_that_cannot_run_is_refused_at_load(vit_bundle: Path, device: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        clipworks.load(vit_bundle, device=device)
    assert caught.value.setting == "device" and " --" not in str(caught.value)  # the CLI adds the flag


def test_the_cli_names_the_device_flag(vit_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipworks.cli.main import main

    assert main(["models", "info", str(vit_bundle), "--device", "quantum"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: unknown device 'quantum'")


# -- backends: the options each one gives ONNX Runtime, as data (only the CPU provider is installed here) ----
CACHE = Path("/engines")
BACKEND_OPTIONS = [
    (CpuBackend(), {}),
    (CudaBackend(), {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}),
    (CudaBackend(target="1"), {"device_id": "1", "arena_extend_strategy": "kSameAsRequested"}),
    (
        TensorRTBackend(RuntimeSettings(cache_dir=CACHE), "2"),
        {
            "device_id": "2",
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": "/engines",
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": "/engines",
        },
    ),
    (
        TensorRTBackend(RuntimeSettings(cache_dir=CACHE, fp16=False, workspace_bytes=2**30)),
        {
            "device_id": "0",
            "trt_fp16_enable": "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": "/engines",
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": "/engines",
            "trt_max_workspace_size": "1073741824",
        },
    ),
    (OpenVINOProviderBackend(RuntimeSettings(cache_dir=CACHE)), {"cache_dir": "/engines"}),
    (
        OpenVINOProviderBackend(RuntimeSettings(cache_dir=CACHE, precision_hint="fp16", threads=4), "gpu"),
        {"cache_dir": "/engines", "device_type": "GPU", "precision": "FP16", "num_of_threads": "4"},
    ),
    (
        CoreMLBackend(RuntimeSettings(cache_dir=CACHE)),
        {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL", "ModelCacheDirectory": "/engines"},
    ),
    (OpenVINOBackend(), {"device": "CPU"}),  # OpenVINO's own runtime: its options are compile properties
]


@pytest.mark.parametrize(("backend", "options"), BACKEND_OPTIONS, ids=repr)
def test_each_backend_builds_its_provider_options(backend, options: dict[str, str]) -> None:
    assert backend.provider_options() == options


def test_the_option_table_covers_every_registered_backend() -> None:
    assert {type(backend).name for backend, _ in BACKEND_OPTIONS} == set(BACKENDS)


def test_engine_caches_default_to_the_clipworks_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path))
    assert TensorRTBackend().provider_options()["trt_engine_cache_path"] == str(tmp_path / "engines" / "tensorrt")
    assert OpenVINOProviderBackend().provider_options()["cache_dir"] == str(tmp_path / "engines" / "openvino-ep")
    assert OpenVINOBackend(target="GPU").compile_config("fp32")["CACHE_DIR"] == str(tmp_path / "engines" / "openvino")


ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("backend", "installed", "chain"),
    [
        (TensorRTBackend(), ALL, ALL),  # nodes TensorRT cannot build run on CUDA, then CPU
        (TensorRTBackend(), [ALL[0], ALL[2]], [ALL[0], ALL[2]]),
        (CudaBackend(), ALL, ALL[1:]),
        (CpuBackend(), ALL, ALL[2:]),
        (OpenVINOProviderBackend(), ["OpenVINOExecutionProvider", *ALL], ["OpenVINOExecutionProvider", ALL[2]]),
    ],
)
def test_each_backend_falls_back_to_the_installed_providers_after_it(backend, installed, chain) -> None:
    assert [provider for provider, _ in backend.providers(installed)] == chain


def test_a_fallback_stays_on_the_same_gpu() -> None:
    cuda = dict(TensorRTBackend(target="1").providers(ALL))["CUDAExecutionProvider"]
    assert cuda["device_id"] == "1"


# -- a provider that is installed but does not start (a GPU build of onnxruntime on a machine without a GPU) -----
def test_the_probe_graph_is_one_relu_as_its_notice_says() -> None:
    import onnx
    from onnx import TensorProto, helper

    shipped = onnx.load(str(sessions._PROBE_GRAPH))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    rebuilt = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="clipworks")
    rebuilt.ir_version = 7
    assert shipped.SerializeToString() == rebuilt.SerializeToString()


def test_a_provider_that_runs_nothing_here_is_found_out_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    assert provider_start_failure("CPUExecutionProvider") is None
    # This CPU build runs a session asked for CUDA on the CPU, as a GPU build does without CUDA's libraries
    # (there ONNX Runtime's log names the missing one: "libcublasLt.so.13: cannot open shared object file").
    provider_start_failure.cache_clear()
    reason = provider_start_failure("CUDAExecutionProvider")
    assert reason is not None and "CUDAExecutionProvider" in reason
    assert capfd.readouterr() == ("", "")  # what ONNX Runtime printed meanwhile went into the reason


def test_probes_from_two_threads_leave_stdout_as_it_was() -> None:
    before = (sys.stdout, os.fstat(1).st_ino)
    provider_start_failure.cache_clear()
    providers = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    threads = [threading.Thread(target=provider_start_failure, args=(p,)) for p in providers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (sys.stdout, os.fstat(1).st_ino) == before


@pytest.mark.parametrize("closed", ["1", "2"])
def test_a_probe_with_a_standard_descriptor_closed_loses_no_later_output(tmp_path: Path, closed: str) -> None:
    import subprocess

    code = (
        "import os, sys\n"
        f"os.close({closed})\n"
        "from clipworks.runtime.sessions import provider_start_failure\n"
        "reason = provider_start_failure('CUDAExecutionProvider')\n"
        f"os.write({3 - int(closed)}, b'after the probe: ' + str(reason is not None).encode())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert b"after the probe: True" in (done.stderr if closed == "1" else done.stdout)


def test_the_log_clause_naming_the_missing_library_is_the_reason() -> None:
    log = (
        "Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file\n"
        "\x1b[1;31m2026-12-03 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 TryGetProviderInfo_CUDA] ... "
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open "
        "shared object file: No such file or directory\n\x1b[m\nFailed to create CUDAExecutionProvider.\n"
    )
    assert sessions._first_reason(log) == "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    assert sessions._first_reason("W: Failed to create CUDAExecutionProvider. Require cuDNN 9") == (
        "Failed to create CUDAExecutionProvider"
    )


@pytest.fixture
def gpu_build_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The providers onnxruntime-gpu lists on this machine (checked by hand with 1.31.1: all three, no GPU)."""
    monkeypatch.setattr(sessions, "available_providers", lambda: list(ALL))


@pytest.mark.usefixtures("gpu_build_listing")
@pytest.mark.parametrize("kind", ["cuda", "tensorrt"])
def test_the_probe_tries_the_gpu_that_was_named(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """cuda:1 on a machine whose GPU 0 works but has no GPU 1 must be refused: the probe is given the index."""
    tried: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    def probe(provider: str, options: tuple[tuple[str, str], ...] = ()) -> str | None:
        tried.append((provider, options))
        return None if dict(options).get("device_id") == "0" else "invalid device ordinal"

    monkeypatch.setattr(sessions, "provider_start_failure", probe)
    assert open_backend(kind).device_id() == 0
    with pytest.raises(UsageError, match=rf"device '{kind}:1': .*could not start it here \(invalid device ordinal\)"):
        open_backend(f"{kind}:1")
    provider = BACKENDS[kind].provider
    assert tried == [(provider, (("device_id", "0"),)), (provider, (("device_id", "1"),))]


def test_the_real_probe_takes_a_device_index() -> None:
    provider_start_failure.cache_clear()
    reason = provider_start_failure("CUDAExecutionProvider", (("device_id", "1"),))
    assert reason is not None and "CUDAExecutionProvider" in reason  # this CPU build has no CUDA at any index


@pytest.mark.usefixtures("gpu_build_listing")
def test_auto_skips_a_gpu_provider_that_does_not_start() -> None:
    assert not isinstance(open_backend("auto"), CudaBackend | TensorRTBackend)


@pytest.mark.usefixtures("gpu_build_listing")
@pytest.mark.parametrize(
    ("device", "needs"),
    [("cuda", r"an NVIDIA GPU with its driver, CUDA"), ("tensorrt:1", r"TensorRT 10's libraries.*device cuda runs")],
)
def test_a_named_gpu_that_does_not_start_is_refused_with_what_it_needs(device: str, needs: str) -> None:
    with pytest.raises(
        UsageError, match=rf"device '{device}': ONNX Runtime has \w+ but could not start it here \("
    ) as e:
        open_backend(device)
    assert re.search(needs, str(e.value)) and str(e.value).endswith("or use device cpu")
    assert e.value.setting == "device" and "\n" not in str(e.value)


@pytest.mark.usefixtures("gpu_build_listing")
def test_the_cli_refuses_a_gpu_that_does_not_start_in_one_line(
    vit_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipworks.cli.main import main

    assert main(["models", "info", str(vit_bundle), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: device 'cuda': ONNX Runtime has CUDAExecutionProvider but could not")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("settings", "fp16", "io_binding"),
    [(RuntimeSettings(), True, True), (RuntimeSettings(fp16=False, io_binding=False), False, False)],
)
def test_accelerators_default_to_fp16_and_io_binding(settings: RuntimeSettings, fp16: bool, io_binding: bool) -> None:
    assert (CudaBackend(settings).fp16, CudaBackend(settings).io_binding) == (fp16, io_binding)
    assert (CpuBackend().fp16, CpuBackend().io_binding) == (False, False)


def test_cpu_settings_reach_the_onnx_runtime_session(vit_bundle: Path) -> None:
    settings = RuntimeSettings(threads=1, allow_spinning=False, arena=False)
    model = clipworks.load(vit_bundle, device="cpu", runtime=settings)
    applied = model.visual.applied_options()
    assert applied["intra_op_threads"] == 1 and applied["cpu_arena"] is False
    assert applied["session_config"] == {"session.intra_op.allow_spinning": "0"}
    assert model.textual.applied_options()["intra_op_threads"] == 1  # one settings object for both towers
    assert clipworks.load(vit_bundle, device="cpu", threads=3).visual.applied_options()["intra_op_threads"] == 3


def test_io_binding_gives_the_same_vectors(vit_bundle: Path, photos) -> None:
    plain = clipworks.load(vit_bundle, device="cpu")
    bound = clipworks.load(vit_bundle, device="cpu", runtime=RuntimeSettings(io_binding=True))
    assert bound.visual.io_binding and not plain.visual.io_binding
    np.testing.assert_array_equal(bound.encode_images(photos[:3]), plain.encode_images(photos[:3]))
    np.testing.assert_array_equal(bound.encode_texts(PROMPTS), plain.encode_texts(PROMPTS))


def test_auto_precision_follows_the_backends_fp16(vit_bundle: Path) -> None:
    assert clipworks.load(vit_bundle, device="cpu").precision == "fp32"
    assert clipworks.load(vit_bundle, device="cpu", runtime=RuntimeSettings(fp16=True)).precision == "fp16"


def test_a_new_backend_is_one_class(vit_bundle: Path) -> None:
    """What docs/ENGINE.md shows: a subclass, registered, is a device choice with its own options."""

    @register_backend
    class QuietCpu(CpuBackend):
        name = "cpu-quiet"
        rank = 99

        def session_config(self) -> dict[str, str]:
            return {**super().session_config(), "session.intra_op.allow_spinning": "0"}

    try:
        assert "cpu-quiet" in device_names() and device_names()[-2:] == ["cpu-quiet", "cpu"]
        assert isinstance(open_backend("cpu-quiet"), QuietCpu)
        model = ClipModel(load_bundle(vit_bundle), device="cpu-quiet")
        applied = model.visual.applied_options()
        assert applied["backend"] == "cpu-quiet" and applied["providers"] == ["CPUExecutionProvider"]
        assert applied["session_config"] == {"session.intra_op.allow_spinning": "0"}
        session = OrtSession(model.bundle.graph("visual", "fp32"), CpuBackend())
        np.testing.assert_allclose(model.visual.run(np.zeros((1, 3, 64, 64))), session.run(np.zeros((1, 3, 64, 64))))
    finally:
        del BACKENDS["cpu-quiet"]


def test_a_bad_image_names_itself(vit_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(BadImage, match=r"broken\.jpg"):
        clipworks.load(vit_bundle).encode_images([bad])
    with pytest.raises(BadImage):
        clipworks.load(vit_bundle).encode_images([io.BytesIO(b"").getvalue()])
