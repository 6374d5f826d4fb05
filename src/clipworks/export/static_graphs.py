"""Static-shape graphs for NPU compilers: fixed batch and text length, an older opset, plain operators only.

The dynamic bundle graphs come from torch's dynamo exporter, which writes opset 18 or newer only. NPU
compilers want less: Pulsar2 was found by trial to take opset 14, the Horizon (D-Robotics) toolchain reads
opsets 10 and 11 only. So these graphs come from torch's TorchScript exporter, which writes opset 14 with
attention spelt out as MatMul -> Softmax -> MatMul (no fused attention op), and fixed shapes then let ONNX
Runtime fold every shape computation into constants (as onnx-simplifier would) before the compiler sees it.
Opsets under 14 are reached by ``relabel_opset``: the exporter cannot write them (its attention and
``unflatten`` need 14, and onnx's version converter has no 14 -> 13 adapters), but the operators a CLIP
graph holds mean the same from opset 11 to 14 once Squeeze/Unsqueeze/ReduceSum/Split take their axes as
attributes. The parity check afterwards runs the relabelled graph in ONNX Runtime, so a wrong rewrite fails.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

from clipworks.errors import ExportCheckFailed

# The lowest opset torch's TorchScript exporter writes for open_clip towers (scaled_dot_product_attention).
EXPORTER_MIN_OPSET = 14
# Operators whose meaning did not change between opset 11 and 14 for the float/int inputs a CLIP graph has
# (later versions only added types such as bfloat16, or attributes checked below).
_SAME_SINCE_11 = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Max", "Min",
    "MatMul", "Gemm", "Conv", "Transpose", "Reshape", "Concat", "Gather", "ReduceMean", "ReduceMax",
    "AveragePool", "MaxPool", "GlobalAveragePool", "ArgMax", "Cast", "Flatten", "Softmax", "Slice",
    "Squeeze", "Unsqueeze", "ReduceSum", "Split", "Identity", "Constant", "Expand", "Where", "Equal", "Clip",
}  # fmt: skip
# Operators that took their axes as an attribute before opset 13 and as a second input since.
_AXES_TO_ATTRIBUTE = {"Squeeze": "axes", "Unsqueeze": "axes", "ReduceSum": "axes", "Split": "split"}


def export_static_towers(
    model: Any,
    image_size: tuple[int, int],
    context_length: int,
    visual_path: Path,
    textual_path: Path,
    *,
    opset: int,
    batch: int,
) -> None:
    """Write both fp32 towers with batch ``batch``, text length ``context_length`` and opset ``opset``."""
    import torch

    from clipworks.export.graphs import build_wrappers

    image_encoder, text_encoder = build_wrappers(model)
    image = torch.randn(batch, 3, *image_size)
    vocab_size = int(model.vocab_size)
    text = torch.randint(1, min(1000, vocab_size - 1), (batch, context_length), dtype=torch.int32)
    text[:, -1] = vocab_size - 1  # an end token, as in real prompts
    for module, example, path, name in (
        (image_encoder, image, visual_path, "image"),
        (text_encoder, text, textual_path, "text"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.onnx"
            _torchscript_export(module, example, raw, name, max(opset, EXPORTER_MIN_OPSET))
            graph = fold_constants(raw)
        if opset < EXPORTER_MIN_OPSET:
            relabel_opset(graph, opset)
        _save(graph, path)


def _torchscript_export(module: Any, example: Any, path: Path, input_name: str, opset: int) -> None:
    import torch

    quiet = contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), torch.no_grad(), quiet:
        warnings.simplefilter("ignore")  # "legacy exporter" and tracer warnings: expected here
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=["embedding"],
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )  # fmt: skip


def fold_constants(path: Path) -> Any:
    """``path`` after ONNX Runtime's basic (standard-operator) rewrites, with unused opset imports dropped.

    With every shape fixed, the Shape -> Gather -> Concat chains the exporter writes become constants, and
    Identity nodes go; the basic level only emits standard ONNX operators, which the rule check confirms.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    folded = path.with_name("folded.onnx")
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(folded))
    used = {node.domain for node in graph.graph.node}
    keep = [o for o in graph.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del graph.opset_import[:]
    graph.opset_import.extend(keep)
    return graph


def relabel_opset(graph: Any, opset: int) -> None:
    """Declare ``graph`` (opset 14) as ``opset`` (11..13), moving axes inputs back into attributes.

    Refuses, naming the operator, anything whose meaning changed in between.
    """
    import onnx
    from onnx import helper, numpy_helper

    if not 11 <= opset < EXPORTER_MIN_OPSET:
        raise ValueError(f"relabel_opset goes down to opsets 11..13, not {opset}")
    inferred = onnx.shape_inference.infer_shapes(graph)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _SAME_SINCE_11:
            raise ExportCheckFailed(
                f"the static graph holds {node.op_type} ({node.name}), which this exporter cannot write for opset "
                f"{opset}; export for a target with opset {EXPORTER_MIN_OPSET} or newer, or report the model"
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        known = onnx.defs.get_schema(node.op_type, opset).attributes
        for name in [a for a in attrs if a not in known]:  # allowzero (Reshape 14), select_last_index (ArgMax 12)
            if attrs[name] != 0:
                raise ExportCheckFailed(
                    f"{node.name}: {node.op_type} with {name}={attrs[name]} has no opset {opset} form"
                )
        kept = [a for a in node.attribute if a.name in known]  # newer attributes at their default value 0: dropped
        del node.attribute[:]
        node.attribute.extend(kept)
        if node.op_type == "Softmax":  # before 13 Softmax flattened from `axis` on: the same only on the last axis
            axis, rank = attrs.get("axis", -1), ranks.get(node.input[0])
            if axis != -1 and (rank is None or axis != rank - 1):
                raise ExportCheckFailed(f"{node.name}: Softmax over axis {axis} has no opset {opset} form")
        if node.op_type in _AXES_TO_ATTRIBUTE and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                raise ExportCheckFailed(f"{node.name}: {node.op_type} with computed axes has no opset {opset} form")
            values = [int(v) for v in constants[node.input[1]].reshape(-1)]
            del node.input[1:]
            node.attribute.append(helper.make_attribute(_AXES_TO_ATTRIBUTE[node.op_type], values))
    for entry in graph.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    graph.ir_version = _ir_version_of(opset)
    used = {name for node in graph.graph.node for name in node.input}
    keep = [t for t in graph.graph.initializer if t.name in used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(keep)


def _ir_version_of(opset: int) -> int:
    """The IR version of the ONNX release that introduced ``opset`` (toolchains such as Horizon's cap it)."""
    from onnx import helper

    return min(ir for _release, ir, default_opset, *_ in helper.VERSION_TABLE if default_opset == opset)


def _save(graph: Any, path: Path) -> None:
    import onnx

    from clipworks.export.graphs import SINGLE_FILE_LIMIT

    path.parent.mkdir(parents=True, exist_ok=True)
    large = graph.ByteSize() > SINGLE_FILE_LIMIT
    onnx.save(graph, str(path), save_as_external_data=large, location=path.name + ".data")
