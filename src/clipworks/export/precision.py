"""Lower-precision copies of an fp32 graph: fp16 for GPUs, dynamic int8 for CPUs."""

from __future__ import annotations

import tempfile
from pathlib import Path

# Cosine similarity to fp32 below which a converted graph is refused. fp16 keeps ~3 significant
# digits per value; dynamic int8 with per-channel weights keeps CLIP rankings but moves vectors more.
COSINE_FLOORS = {"fp16": 0.999, "int8": 0.97}


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # Inputs and outputs stay float32 so callers never change; LayerNorm/Softmax overflow is
    # avoided by keeping those ops in fp32 inside the graph.
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax"],
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dst))


def to_int8(src: Path, dst: Path, *, include_conv: bool = False) -> None:
    """Dynamic quantisation: int8 weights, activations quantised per batch at run time (no calibration set).

    Convolutions are left in fp32 by default: ORT's ConvInteger is slower than fp32 Conv on CPUs,
    and a ViT has a single patch convolution.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst.parent.mkdir(parents=True, exist_ok=True)
    ops = ["MatMul", "Gemm", "Conv"] if include_conv else ["MatMul", "Gemm"]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantising the raw graph still works
            prepared = src
        quantize_dynamic(
            str(prepared),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=ops,
            extra_options={"MatMulConstBOnly": True},
        )
