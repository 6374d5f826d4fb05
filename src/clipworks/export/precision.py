"""Lower-precision copies of an fp32 graph: fp16 for GPUs, dynamic and static int8 for CPUs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.errors import BadImage, status

# Cosine similarity to fp32 below which a converted graph is refused. fp16 keeps ~3 significant
# digits per value; int8 with per-channel weights keeps CLIP rankings but moves vectors more. Static
# int8 fixes each activation's range from calibration photos, so a photo unlike them can clip: the
# same floor as dynamic int8, measured on the check photos rather than the calibration ones.
COSINE_FLOORS = {"fp16": 0.999, "int8": 0.97, "int8-static": 0.97}


def lower(precision: str, src: Path, dst: Path, calibration: Sequence[np.ndarray] = ()) -> None:
    """Write the ``precision`` copy of the fp32 graph ``src``; ``calibration`` feeds static int8 only."""
    if precision == "fp16":
        to_fp16(src, dst)
    elif precision == "int8":
        to_int8(src, dst)
    elif precision == "int8-static":
        to_int8_static(src, dst, calibration)
    else:
        raise ValueError(f"no conversion to {precision!r}")


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

    dst.parent.mkdir(parents=True, exist_ok=True)
    ops = ["MatMul", "Gemm", "Conv"] if include_conv else ["MatMul", "Gemm"]
    with _prepared(src) as prepared:
        quantize_dynamic(
            str(prepared),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=ops,
            extra_options={"MatMulConstBOnly": True},
        )


# Photos used to fix static int8's activation ranges: enough to see typical ranges, bounded in memory
# (64 photos at 224 px are 38 MB of pixels) and in export time.
CALIBRATION_LIMIT = 64


def calibration_pixels(
    paths: Sequence[Path],
    preprocess_cfg: dict[str, Any],
    *,
    limit: int = CALIBRATION_LIMIT,
    log: Callable[[str], None] = status,
) -> np.ndarray:
    """The first ``limit`` readable photos of ``paths``, preprocessed as the runtime does, ``(N, 3, H, W)``.

    A photo that cannot be decoded is skipped with a warning naming it; none readable is an error.
    """
    from clipworks.imaging import PreprocessConfig, load_image, preprocess

    cfg = PreprocessConfig.from_dict(preprocess_cfg)
    pixels: list[np.ndarray] = []
    for path in paths:
        if len(pixels) == limit:
            break
        try:
            pixels.append(preprocess(load_image(path), cfg))
        except BadImage as e:
            log(f"warning: calibration photo skipped: {e}")
    if not pixels:
        raise BadImage(f"none of the {len(paths)} calibration photos could be read; pass a folder of JPEG/PNG photos")
    return np.stack(pixels)


def to_int8_static(src: Path, dst: Path, calibration: Sequence[np.ndarray]) -> None:
    """Static quantisation (QDQ): int8 weights and activations whose ranges come from ``calibration``.

    ``calibration`` holds input batches for the graph (preprocessed photos for the image tower, token
    ids for the text tower). Only MatMuls with constant weights are quantised, as in ``to_int8``: ORT
    fuses each DequantizeLinear -> MatMul into an integer product with a fixed activation scale, which
    saves the per-batch range search dynamic int8 pays at run time.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self, graph: Path) -> None:
            name, dtype = _input_of(graph)
            self._feeds = iter([{name: batch.astype(dtype, copy=False)} for batch in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with _prepared(src) as prepared:
        quantize_static(
            str(prepared),
            str(dst),
            Batches(prepared),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: the pair x86 int8 kernels take
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
        )


def _input_of(path: Path) -> tuple[str, np.dtype]:
    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    return graph_input.name, onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)


@contextmanager
def _prepared(src: Path) -> Iterator[Path]:
    """``src`` with shapes inferred for the quantiser, or ``src`` itself when inference fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantising the raw graph still works
            prepared = src
        yield prepared
