"""``clipworks export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipworks.errors import UsageError
from clipworks.models.bundle import DEFAULT_PRECISIONS


def _parse_batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, not {value!r}")
    return int(value)


def export(
    model: Annotated[
        str, typer.Argument(help="open_clip architecture (RN50, ViT-B-32, ViT-B/32, ...) or config JSON.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle folder (default: the model cache).")] = None,
    pretrained: Annotated[str, typer.Option(help="open_clip tag, checkpoint path, or 'random'.")] = "openai",
    precision: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: fp32,fp16,int8,int8-static (default fp32,int8,int8-static; fp32 with --target)."
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size for static-shape runtimes.")] = "dynamic",
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer; --target sets its compiler's own).")] = 18,
    seed: Annotated[int, typer.Option(help="Seed for --pretrained random.")] = 0,
    check_images: Annotated[
        Path | None, typer.Option(help="Folder of photos for the parity check (default: bundled samples).")
    ] = None,
    calib_images: Annotated[
        Path | None,
        typer.Option(
            help="Folder of your own photos to calibrate int8-static or a --target's compiler "
            "(default: bundled samples)."
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Write static graphs and a calibration pack for an NPU compiler: axera (Pulsar2), rknn "
            "(RKNN-Toolkit2), sophgo (TPU-MLIR), hailo (Dataflow Compiler), horizon (hb_mapper), tensorrt. "
            "See docs/EDGE.md."
        ),
    ] = None,
    calib_size: Annotated[int, typer.Option(help="Photos and prompts in a --target's calibration pack.")] = 50,
    calib_texts: Annotated[
        Path | None,
        typer.Option(
            help="File of prompts, one a line, to calibrate a --target's text tower "
            "(default: the shipped ImageNet class names in their prompt templates)."
        ),
    ] = None,
    compare_with: Annotated[
        Path | None,
        typer.Option(
            help="A dynamic bundle of the same weights (a plain export) the --target graphs must match "
            "in ONNX Runtime within 1e-4."
        ),
    ] = None,
    fuse_attention: Annotated[
        bool,
        typer.Option(
            "--fuse-attention",
            help="Fuse attention into ONNX Runtime's MultiHeadAttention (runs on ONNX Runtime only; measure it "
            "with clipworks bench: it gained nothing on an AVX2-only CPU).",
        ),
    ] = False,
) -> None:
    """Export an open_clip model to a verified ONNX bundle (fp32 must match open_clip within 1e-4).

    With --target, the graphs are static (batch 1 unless --batch, full text length) at the compiler's opset, and
    BUNDLE/TARGET/ holds the calibration pack, the compiler's configs and COMPILE.md with the commands to run next.
    """
    from clipworks.export import export_model
    from clipworks.export.targets import get_target
    from clipworks.models.registry import parse_model_name
    from clipworks.pipeline import collect_image_files

    edge = get_target(target) if target is not None else None  # an unknown name fails before torch loads
    if edge is None and (calib_texts or compare_with):
        raise UsageError("--calib-texts and --compare-with go with --target")
    if edge is not None and calib_size < 1:
        raise UsageError(f"--calib-size must be at least 1, not {calib_size}")
    if precision is None:
        precision = "fp32" if edge else ",".join(DEFAULT_PRECISIONS)
    precisions = [p.strip() for p in precision.split(",") if p.strip()]
    if out is None:
        arch = model.replace("/", "-")
        tag = "random" if pretrained == "random" else Path(pretrained).stem
        try:
            ref = parse_model_name(f"{arch}::{tag}")
            out = ref.cache_path()
        except Exception:
            from clipworks.settings import models_dir

            out = models_dir() / f"{Path(arch).stem}__{tag}"
        if edge is not None:  # beside the dynamic bundle, never over it
            out = out.with_name(f"{out.name}__{edge.name}")
    images = collect_image_files([check_images]) if check_images else None
    calibration = collect_image_files([calib_images]) if calib_images else None
    if calibration and "int8-static" not in precisions and edge is None:
        raise UsageError("--calib-images calibrates int8-static only: add it to --precision, e.g. fp32,int8-static")
    export_model(
        model, out, pretrained=pretrained, precisions=precisions, batch=_parse_batch(batch), opset=opset,
        seed=seed, check_images=images, calib_images=calibration, fuse_attention=fuse_attention,
        target=edge.name if edge else None, calib_size=calib_size, calib_texts=calib_texts, compare_with=compare_with,
    )  # fmt: skip
