"""NPU and accelerator compilers as export targets: each one's graph rules, calibration pack and next command.

A target is one ``Target`` subclass registered in ``TARGETS``: the opset, IR version and operators its compiler
takes (with the document that says so, see docs/EDGE.md), which towers it compiles, how it wants calibration
samples laid out, and the commands a user runs next. ``clipworks export MODEL --target NAME`` writes the static
graphs into the bundle as usual and everything else into ``BUNDLE/NAME/``; the compilers do not install here,
so the commands are written out, not run.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from clipworks.atomic import atomic_write_text
from clipworks.errors import UsageError
from clipworks.export.calibration import CalibrationSet
from clipworks.models.bundle import Tower, graph_relpath

INPUT_NAMES: dict[str, str] = {"visual": "image", "textual": "text"}
TOWERS: tuple[Tower, ...] = ("visual", "textual")
# No NPU compiler here takes these: fused attention (ONNX Runtime contrib ops, or ONNX's own from opset 23),
# control flow, and data-dependent shapes.
ALWAYS_FORBIDDEN = frozenset(
    {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "If", "Loop", "Scan", "NonZero"}
)


@dataclass
class TargetJob:
    """One target export: where its files go and what they are made from."""

    folder: Path  # BUNDLE/<target>/: configs, packs and COMPILE.md; the commands run from here
    batch: int
    image_size: tuple[int, int]  # (height, width)
    context_length: int
    calibration: CalibrationSet
    model_name: str
    written: list[str] = field(default_factory=list)

    def graph(self, tower: Tower) -> str:
        """The tower's graph, relative to ``folder`` (the commands are run from there)."""
        return f"../{graph_relpath(tower, 'fp32')}"

    def shape(self, tower: Tower) -> list[int]:
        if tower == "visual":
            return [self.batch, 3, *self.image_size]
        return [self.batch, self.context_length]

    def dims(self, tower: Tower, sep: str = "x") -> str:
        return sep.join(str(d) for d in self.shape(tower))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        path = self.folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written.append(relpath)

    def write_text(self, relpath: str, text: str) -> None:
        path = self.folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        self.written.append(relpath)

    def write_json(self, relpath: str, data: dict[str, Any]) -> None:
        self.write_text(relpath, json.dumps(data, indent=2) + "\n")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class Target:
    """The rules one compiler sets for its input graph, and the files it wants beside it."""

    name: ClassVar[str]
    compiler: ClassVar[str]
    opset: ClassVar[int]
    max_ir_version: ClassVar[int | None] = None
    forbidden_ops: ClassVar[frozenset[str]] = frozenset()  # beyond ALWAYS_FORBIDDEN
    # Towers the compiler builds; the others run on the host CPU through ONNX Runtime (the static graph as well).
    npu_towers: ClassVar[tuple[Tower, ...]] = TOWERS
    text_dtype: ClassVar[str] = "int32"
    calibration_format: ClassVar[str]
    sources: ClassVar[tuple[str, ...]]  # where the rules and formats come from (docs/EDGE.md cites them too)

    @property
    def all_forbidden(self) -> frozenset[str]:
        return ALWAYS_FORBIDDEN | self.forbidden_ops

    def rules(self) -> dict[str, Any]:
        """What ``target.json`` records and the tests check the graphs against."""
        return {
            "name": self.name,
            "compiler": self.compiler,
            "opset": self.opset,
            "max_ir_version": self.max_ir_version,
            "static_batch": True,
            "fixed_text_length": True,
            "text_dtype": self.text_dtype,
            "forbidden_ops": sorted(self.all_forbidden),
            "npu_towers": list(self.npu_towers),
            "calibration_format": self.calibration_format,
            "sources": list(self.sources),
        }

    def violations(self, graph: Any, tower: Tower, job: TargetJob) -> list[str]:
        """How the loaded ONNX ``graph`` of ``tower`` breaks this target's rules (empty: it keeps them)."""
        problems = []
        opsets = {o.domain or "ai.onnx": o.version for o in graph.opset_import}
        if opsets.get("ai.onnx") != self.opset:
            problems.append(f"opset {opsets.get('ai.onnx')}, {self.compiler} wants {self.opset}")
        if set(opsets) - {"ai.onnx"} or any(n.domain not in ("", "ai.onnx") for n in graph.graph.node):
            problems.append(f"operators outside the standard ONNX domain: {sorted(set(opsets) - {'ai.onnx'})}")
        if self.max_ir_version is not None and graph.ir_version > self.max_ir_version:
            problems.append(f"IR version {graph.ir_version}, {self.compiler} reads up to {self.max_ir_version}")
        used = sorted({n.op_type for n in graph.graph.node} & self.all_forbidden)
        if used:
            problems.append(f"operators {self.compiler} rejects: {', '.join(used)}")
        want_dtype = "float32" if tower == "visual" else self.text_dtype
        for value, shape in ((graph.graph.input[0], job.shape(tower)), (graph.graph.output[0], None)):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
            if any(not isinstance(d, int) or d < 1 for d in dims):
                problems.append(f"{value.name} has dynamic dims {dims}")
            elif shape is not None and dims != shape:
                problems.append(f"{value.name} has shape {dims}, not {shape}")
        from onnx import helper

        got = np.dtype(helper.tensor_dtype_to_np_dtype(graph.graph.input[0].type.tensor_type.elem_type)).name
        if got != want_dtype:
            problems.append(f"input {graph.graph.input[0].name} is {got}, not {want_dtype}")
        return problems

    def write(self, job: TargetJob) -> None:
        """The calibration pack, the compiler configs, ``COMPILE.md`` and ``target.json`` into ``job.folder``."""
        self.write_pack(job)
        steps = self.next_steps(job)
        cal = job.calibration
        host = [t for t in TOWERS if t not in self.npu_towers]
        lines = [
            f"# {job.model_name} for {self.compiler} (clipworks export --target {self.name})",
            "",
            "Run these from this folder. The graphs are `../visual/model.onnx` and `../textual/model.onnx`: fp32,",
            f"opset {self.opset}, batch {job.batch}, image {job.dims('visual')}, text {job.dims('textual')} "
            f"({self.text_dtype} token ids),",
            "checked against open_clip (1e-4 on normalised embeddings) and against this target's rules.",
            "",
            f"Calibration ({self.calibration_format}): {len(cal.visual)} photos from {cal.images_source}, "
            "preprocessed exactly as clipworks does at run time; "
            f"{len(cal.prompts)} prompts from {cal.prompts_source}.",
        ]
        if host:
            lines += ["", f"The {' and '.join(host)} tower runs on the host CPU with ONNX Runtime "
                      f"(its static graph is in the bundle); {self.compiler} builds the rest."]  # fmt: skip
        lines += ["", steps.strip(), "", "Sources: " + "; ".join(self.sources), ""]
        job.write_text("COMPILE.md", "\n".join(lines))
        job.write_json("target.json", {**self.rules(), "batch": job.batch, "files": sorted(job.written)})

    def write_pack(self, job: TargetJob) -> None:
        raise NotImplementedError

    def next_steps(self, job: TargetJob) -> str:
        raise NotImplementedError


class Pulsar2(Target):
    """Axera AX650 / AX620E NPUs: ``pulsar2 build`` with a JSON config and a tar of ``.npy`` samples per input."""

    name = "axera"
    compiler = "Pulsar2"
    opset = 14  # what the Axera CLIP port settled on by trial; Pulsar2 documents opset 11 and newer
    calibration_format = "a tar of float32/int32 .npy samples per tower and a Pulsar2 JSON config"
    sources = (
        "Pulsar2 config reference: https://github.com/AXERA-TECH/pulsar2-docs-en source/user_guides_config/config.md",
        "AX650 operator list: https://github.com/AXERA-TECH/pulsar2-docs-en source/appendix/op_support_list_ax650.md",
    )
    # Not in the AX650 NPU operator list (the ones a traced model could produce).
    forbidden_ops = frozenset({"Einsum", "CumSum", "Trilu", "Range", "Neg", "Reciprocal", "TopK", "ScatterND"})

    def write_pack(self, job: TargetJob) -> None:
        for tower in self.npu_towers:
            samples = job.calibration.batches(tower, job.batch)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for i, sample in enumerate(samples):
                    data = _npy_bytes(sample.astype(np.float32 if tower == "visual" else np.int32))
                    info = tarfile.TarInfo(f"{tower}_{i:04d}.npy")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            job.write_bytes(f"calibration/{tower}.tar", buffer.getvalue())
            name = INPUT_NAMES[tower]
            job.write_json(f"pulsar2_{tower}.json", {
                "model_type": "ONNX",
                "npu_mode": "NPU1",
                "quant": {
                    "input_configs": [{
                        "tensor_name": name,
                        "calibration_dataset": f"calibration/{tower}.tar",
                        "calibration_size": len(samples),
                        "calibration_format": "Numpy",
                    }],
                    "calibration_method": "MinMax",
                    "precision_analysis": True,
                    "precision_analysis_method": "EndToEnd",
                },
                # The samples are already normalised: no mean/std here, and the runtime feeds the same floats.
                "input_processors": [
                    {"tensor_name": name, "tensor_layout": "NCHW", "src_layout": "NCHW", "src_dtype": "FP32"}
                    if tower == "visual" else {"tensor_name": name, "src_dtype": "S32"}
                ],
                "compiler": {"check": 0},
            })  # fmt: skip

    def next_steps(self, job: TargetJob) -> str:
        cmds = [
            f"pulsar2 build --input {job.graph(t)} --config pulsar2_{t}.json --output_dir build_{t} "
            f"--output_name clip_{t}.axmodel --target_hardware AX650"
            for t in self.npu_towers
        ]
        return "```sh\n" + "\n".join(cmds) + "\n```\n(AX620E: `--target_hardware AX620E`; more NPU cores: `npu_mode`.)"


class RknnToolkit2(Target):
    """Rockchip RK3588 / RK3568 / RK3566 NPUs: RKNN-Toolkit2's Python API with a ``dataset.txt`` of sample files."""

    name = "rknn"
    compiler = "RKNN-Toolkit2"
    opset = 17  # RKNN-Toolkit2 2.x lists its ONNX support against opset 19, LayerNormalization included
    calibration_format = "dataset_<tower>.txt listing one .npy sample per line (image samples NHWC)"
    sources = (
        "RKNN-Toolkit2 ONNX operator list: "
        "https://github.com/airockchip/rknn-toolkit2 doc/RKNNToolKit2_OP_Support-v2.1.0.md",
        "npy calibration samples must be NHWC: https://github.com/rockchip-linux/rknn-toolkit/issues/421",
    )
    # Marked "Not Supported" in RKNN-Toolkit2's ONNX operator list.
    forbidden_ops = frozenset({
        "Einsum", "CumSum", "Trilu", "Range", "Neg", "Reciprocal", "TopK", "GatherND", "ScatterElements",
        "Not", "Or", "Sum", "Mean", "ReduceL2", "ReduceProd", "Round", "Sign", "Abs", "Ceil", "CastLike",
    })  # fmt: skip

    def write_pack(self, job: TargetJob) -> None:
        for tower in self.npu_towers:
            lines = []
            for i, sample in enumerate(job.calibration.batches(tower, job.batch)):
                # RKNN reads 4-D numpy samples as NHWC and transposes them to the model's NCHW itself.
                data = sample.transpose(0, 2, 3, 1) if tower == "visual" else sample
                relpath = f"calibration/{tower}/{i:04d}.npy"
                job.write_bytes(relpath, _npy_bytes(np.ascontiguousarray(data)))
                lines.append(relpath)
            job.write_text(f"dataset_{tower}.txt", "\n".join(lines) + "\n")
        builds = []
        for tower in self.npu_towers:
            config = "mean_values=[[0, 0, 0]], std_values=[[1, 1, 1]], " if tower == "visual" else ""
            builds.append(
                f"rknn = RKNN()\n"
                f"rknn.config({config}target_platform=PLATFORM)  # the samples are already normalised\n"
                f"assert rknn.load_onnx(model={job.graph(tower)!r}) == 0\n"
                f"assert rknn.build(do_quantization=True, dataset='dataset_{tower}.txt') == 0\n"
                f"assert rknn.export_rknn('clip_{tower}.rknn') == 0\n"
                f"rknn.release()\n"
            )
        script = (
            "# RKNN-Toolkit2 build written by `clipworks export --target rknn`; run it from this folder.\n"
            "import sys\n\nfrom rknn.api import RKNN\n\n"
            "PLATFORM = sys.argv[1] if len(sys.argv) > 1 else 'rk3588'\n\n" + "\n".join(builds)
        )
        job.write_text("rknn_build.py", script)

    def next_steps(self, job: TargetJob) -> str:
        return (
            "```sh\npython rknn_build.py rk3588   # or rk3568, rk3566, rk3562, rv1106\n```\n"
            "The text tower loses accuracy at int8; set `do_quantization=False` for it in `rknn_build.py` to keep fp16."
        )


class TpuMlir(Target):
    """Sophgo BM1684X / BM1688 / CV186 TPUs: TPU-MLIR's model_transform -> run_calibration -> model_deploy."""

    name = "sophgo"
    compiler = "TPU-MLIR"
    opset = 17
    calibration_format = "a folder of .npz samples per tower, keyed by the graph's input name"
    sources = (
        "TPU-MLIR user interface (model_transform, run_calibration, model_deploy): "
        "https://github.com/sophgo/tpu-mlir docs/developer_manual/source_en/03_user_interface.rst",
        "npz/npy/image calibration folders: "
        "https://github.com/sophgo/tpu-mlir docs/quick_start/source_en/07_quantization.rst",
    )

    def write_pack(self, job: TargetJob) -> None:
        for tower in self.npu_towers:
            for i, sample in enumerate(job.calibration.batches(tower, job.batch)):
                buffer = io.BytesIO()
                np.savez(buffer, **{INPUT_NAMES[tower]: sample})
                job.write_bytes(f"calibration/{tower}/{i:04d}.npz", buffer.getvalue())

    def next_steps(self, job: TargetJob) -> str:
        cmds = []
        for t in self.npu_towers:
            count = len(job.calibration.batches(t, job.batch))
            cmds += [
                f"model_transform.py --model_name clip_{t} --model_def {job.graph(t)} "
                f"--input_shapes [[{job.dims(t, ',')}]] --mlir clip_{t}.mlir",
                f"run_calibration.py clip_{t}.mlir --dataset calibration/{t} --input_num {count} "
                f"-o clip_{t}_cali_table",
                f"model_deploy.py --mlir clip_{t}.mlir --quantize INT8 --calibration_table clip_{t}_cali_table "
                f"--chip bm1684x --model clip_{t}_int8.bmodel",
                f"bmrt_test --bmodel clip_{t}_int8.bmodel   # latency at batch {job.batch}",
            ]
        return (
            "```sh\n" + "\n".join(cmds) + "\n```\n"
            "`--quantize F16` (no calibration table) keeps the text tower in float; `--chip bm1688` or `cv186x` for "
            "other boards. Export again with `--batch N` for bmrt_test's figures at batch N."
        )


class HailoDfc(Target):
    """Hailo-8 / Hailo-8L / Hailo-10: the Dataflow Compiler's parser -> optimize -> compiler, image tower only."""

    name = "hailo"
    compiler = "Hailo Dataflow Compiler"
    opset = 14
    npu_towers = ("visual",)  # as in Hailo's CLIP application, the text tower runs on the host
    calibration_format = "one .npy calibration set (N, H, W, 3) float32, NHWC as the Dataflow Compiler reads it"
    sources = (
        "Hailo Dataflow Compiler user guide (parse, optimize with a calibration set, compile)",
        "text encoding on the host: https://github.com/hailo-ai/hailo-CLIP",
    )

    def write_pack(self, job: TargetJob) -> None:
        job.write_bytes(
            "calibration/visual.npy", _npy_bytes(np.ascontiguousarray(job.calibration.visual.transpose(0, 2, 3, 1)))
        )

    def next_steps(self, job: TargetJob) -> str:
        return (
            "```sh\n"
            f"hailo parser onnx {job.graph('visual')} --hw-arch hailo8   # writes model.har\n"
            "hailo optimize model.har --hw-arch hailo8 --calib-set-path calibration/visual.npy"
            "   # model_optimized.har\n"
            "hailo compiler model_optimized.har --hw-arch hailo8   # model.hef\n"
            "```\n(Hailo-8L: `--hw-arch hailo8l`.) The calibration set is already normalised: add no normalization "
            "layer in the model script."
        )


class HorizonBpu(Target):
    """Horizon / D-Robotics BPUs (RDK X3, J5, X5): ``hb_mapper makertbin`` with a YAML config."""

    name = "horizon"
    compiler = "Horizon OpenExplorer (hb_mapper)"
    opset = 11  # "ONNX models with ir_version <= 7, opset 10 and opset 11"
    max_ir_version = 7
    npu_towers = ("visual",)  # token ids are not a BPU feature map; the text tower runs on the host
    calibration_format = "a folder of raw float32 NCHW files (numpy tofile) per tower"
    sources = (
        "RDK toolchain overview (opset 10/11, ir_version <= 7): "
        "https://d-robotics.github.io/rdk_doc/en/Advanced_development/toolchain_development/overview",
        "hb_mapper makertbin: https://developer.horizon.cc horizon_j5_open_explorer_cn_doc hb_mapper_makertbin.html",
    )

    def write_pack(self, job: TargetJob) -> None:
        for tower in self.npu_towers:
            for i, sample in enumerate(job.calibration.batches(tower, job.batch)):
                job.write_bytes(f"calibration/{tower}/{i:04d}.bin", sample.astype(np.float32).tobytes())
            job.write_text(f"horizon_{tower}.yaml", "\n".join([
                "model_parameters:",
                f"  onnx_model: {job.graph(tower)}",
                "  march: bernoulli2   # RDK X3; J5: bayes, X5: bayes-e",
                f"  working_dir: build_{tower}",
                f"  output_model_file_prefix: clip_{tower}",
                "input_parameters:",
                f"  input_name: {INPUT_NAMES[tower]}",
                f"  input_shape: {job.dims(tower)}",
                "  input_type_train: featuremap",
                "  input_layout_train: NCHW",
                "  input_type_rt: featuremap",
                "  input_layout_rt: NCHW",
                "  norm_type: no_preprocess   # the samples and the runtime's input are already normalised",
                "calibration_parameters:",
                f"  cal_data_dir: ./calibration/{tower}",
                "  cal_data_type: float32",
                "  calibration_type: default",
                "compiler_parameters:",
                "  compile_mode: latency",
                "  optimize_level: O3",
                "",
            ]))  # fmt: skip

    def next_steps(self, job: TargetJob) -> str:
        return (
            "```sh\n"
            f"hb_mapper checker --model-type onnx --march bernoulli2 --model {job.graph('visual')}\n"
            "hb_mapper makertbin --config horizon_visual.yaml --model-type onnx   # build_visual/clip_visual.bin\n"
            "```"
        )


class TensorRt(Target):
    """NVIDIA GPUs and Jetson: ``trtexec`` builds an engine from the static graph (fp16; no calibration pack)."""

    name = "tensorrt"
    compiler = "TensorRT"
    opset = 17  # LayerNormalization as one node, which TensorRT 8.6 and newer parse natively
    calibration_format = "none: TensorRT builds fp16 here; its implicit int8 calibration is deprecated"
    sources = ("trtexec: https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html",)

    def write_pack(self, job: TargetJob) -> None:
        return None

    def next_steps(self, job: TargetJob) -> str:
        cmds = [f"trtexec --onnx={job.graph(t)} --saveEngine=clip_{t}.plan --fp16" for t in self.npu_towers]
        return "```sh\n" + "\n".join(cmds) + "\ntrtexec --loadEngine=clip_visual.plan   # latency\n```"


TARGETS: dict[str, Target] = {
    t.name: t for t in (Pulsar2(), RknnToolkit2(), TpuMlir(), HailoDfc(), HorizonBpu(), TensorRt())
}


def get_target(name: str) -> Target:
    """The target called ``name``; unknown: one line listing them all."""
    try:
        return TARGETS[name.strip().lower()]
    except KeyError:
        raise UsageError(f"unknown --target {name!r}: choose one of {', '.join(TARGETS)}") from None


def target_names() -> Sequence[str]:
    return list(TARGETS)
