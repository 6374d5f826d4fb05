"""``clipworks export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipworks.errors import UsageError


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
    precision: Annotated[str, typer.Option(help="Comma-separated: fp32,fp16,int8,int8-static.")] = "fp32,int8",
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size for static-shape runtimes.")] = "dynamic",
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 18,
    seed: Annotated[int, typer.Option(help="Seed for --pretrained random.")] = 0,
    check_images: Annotated[
        Path | None, typer.Option(help="Folder of photos for the parity check (default: bundled samples).")
    ] = None,
    calib_images: Annotated[
        Path | None,
        typer.Option(help="Folder of your own photos to calibrate int8-static (default: bundled samples)."),
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
    """Export an open_clip model to a verified ONNX bundle (fp32 must match open_clip within 1e-4)."""
    from clipworks.export import export_model
    from clipworks.models.registry import parse_model_name
    from clipworks.pipeline import collect_image_files

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
    images = collect_image_files([check_images]) if check_images else None
    calibration = collect_image_files([calib_images]) if calib_images else None
    if calibration and "int8-static" not in precisions:
        raise UsageError("--calib-images calibrates int8-static only: add it to --precision, e.g. fp32,int8-static")
    export_model(
        model, out, pretrained=pretrained, precisions=precisions, batch=_parse_batch(batch), opset=opset,
        seed=seed, check_images=images, calib_images=calibration, fuse_attention=fuse_attention,
    )  # fmt: skip
