"""Options every model-running command shares, and small rendering helpers."""

from __future__ import annotations

from typing import Annotated

import typer

from clipworks.errors import status
from clipworks.settings import DEFAULT_MODEL

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="CLIPWORKS_MODEL",
        help="Registry name (ViT-B-32::openai, ViT-B/32, ...) or bundle path.",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, tensorrt, openvino or coreml.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto, fp32, fp16 or int8 (auto: fp16 on a GPU, else fp32).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="ONNX Runtime threads (default: all cores).")]
MODEL_DEFAULT = DEFAULT_MODEL


def load_model(model: str, device: str, precision: str, threads: int | None = None, preprocess: str = "exact"):  # type: ignore[no-untyped-def]
    from clipworks.runtime.encoder import load

    return load(model, device=device, precision=precision, threads=threads, preprocess=preprocess)  # type: ignore[arg-type]


info = status
