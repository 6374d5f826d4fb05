"""``clipworks export``: open_clip model -> verified ONNX bundle, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.errors import ExportCheckFailed, UsageError, status
from clipworks.export.calibration import DEFAULT_CALIBRATION_SIZE, CalibrationSet, read_calibration_set
from clipworks.export.graphs import DEFAULT_OPSET, export_towers
from clipworks.export.hf_text import is_hf_tokenizer, write_hf_tokenizer_files
from clipworks.export.optimize import optimize_towers
from clipworks.export.precision import COSINE_FLOORS, calibration_pixels, lower
from clipworks.export.source import RANDOM, SourceModel, load_source_model, load_source_tokenizer
from clipworks.export.static_graphs import export_static_towers
from clipworks.export.targets import Target, TargetJob, get_target
from clipworks.models.bundle import PRECISIONS, Bundle, BundleMeta, graph_relpath, write_json
from clipworks.models.family import TextTokenizer, family_for_config
from clipworks.ops import l2_normalize

# fp32 graphs must reproduce open_clip within this, on L2-normalised embeddings (what every caller uses).
FP32_TOLERANCE = 1e-4
CHECK_IMAGES = Path(__file__).resolve().parents[1] / "data" / "check_images"
CHECK_PROMPTS = (
    "a photo of a dog",
    "a close-up photo of a colourful butterfly on a flower",
    "fruit",
    "a street with buildings and cars at night, seen from above",
    "",
    "an old man wearing a red hat 🎩 &amp; a scarf",
)


@dataclass
class ExportReport:
    out: Path
    arch: str
    pretrained: str
    precisions: list[str]
    checks: dict[str, dict[str, float]] = field(default_factory=dict)


def export_model(
    model: str,
    out: str | Path,
    *,
    pretrained: str = "openai",
    precisions: Sequence[str] = ("fp32",),
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    check_images: Sequence[Path] | None = None,
    calib_images: Sequence[Path] | None = None,
    fuse_attention: bool = False,
    target: str | None = None,
    calib_size: int = DEFAULT_CALIBRATION_SIZE,
    calib_texts: Path | None = None,
    compare_with: Path | None = None,
    log: Callable[[str], None] = status,
) -> ExportReport:
    """Export, verify against open_clip, and only then move the bundle into place at ``out``.

    ``fuse_attention``: the fp32 graphs get fused attention (ONNX Runtime contrib ops, see
    ``clipworks.export.optimize``) before the check and before the other precisions are made from them.
    Off by default: the plain graphs run on every runtime (Immich's providers, NPU compilers), and on an
    AVX2-only CPU the fused ones measured no faster (benchmarks/RESULTS.md, "Model graph").
    ``calib_images`` calibrate ``int8-static`` (default: the check photos).

    ``target`` (``clipworks.export.targets``: axera, rknn, sophgo, hailo, horizon, tensorrt): static fp32 graphs
    that keep that compiler's rules, plus ``out/<target>/`` with the calibration pack built from ``calib_images``
    (``calib_size`` of them) and ``calib_texts`` (a file of prompts; default: shipped class names in templates),
    the compiler configs and the commands to run next. ``compare_with``: a dynamic bundle of the same weights whose
    fp32 graphs the new ones must match in ONNX Runtime within 1e-4.
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UsageError(f"unknown precision {bad[0]!r}: choose from {', '.join(PRECISIONS)}")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, not {batch}")
    edge = get_target(target) if target is not None else None
    if edge is not None:
        if list(precisions) not in (["fp32"], []):
            raise UsageError(f"--target {edge.name} writes fp32 graphs: {edge.compiler} quantises them itself from "
                             "the calibration pack; leave out --precision")  # fmt: skip
        if calib_size < 1:
            raise UsageError(f"--calib-size must be at least 1, not {calib_size}")
        batch = batch or 1
        opset = edge.opset
    wanted = ["fp32", *[p for p in precisions if p != "fp32"]]
    out = Path(out).expanduser()
    log(f"loading {model} ({pretrained}) with open_clip")
    src = load_source_model(model, pretrained, seed=seed)
    calibration = _read_calibration(src, calib_images, calib_size, calib_texts, log) if edge else None
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        report = _build(src, work, wanted, batch, opset, check_images, calib_images, fuse_attention, log, edge)
        if edge is not None and calibration is not None:
            report.checks.update(_finish_target(src, work, edge, batch or 1, calibration, compare_with, log))
        _replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.out = out
    log(f"wrote {out} ({', '.join(wanted)})")
    return report


def _build(
    src: SourceModel,
    work: Path,
    precisions: list[str],
    batch: int | None,
    opset: int,
    check_images: Sequence[Path] | None,
    calib_images: Sequence[Path] | None,
    fuse_attention: bool,
    log: Callable[[str], None],
    edge: Target | None = None,
) -> ExportReport:
    size = tuple(src.preprocess_cfg["size"])
    context_length = int(src.model_config["text_cfg"]["context_length"])
    log(f"exporting {src.arch} to ONNX (opset {opset}, batch {batch or 'dynamic'})")
    graph_paths = (work / graph_relpath("visual", "fp32"), work / graph_relpath("textual", "fp32"))
    if edge is not None:
        export_static_towers(src.model, size, context_length, *graph_paths, opset=opset, batch=batch or 1)
        dynamic_text = False
    else:
        dynamic_text = export_towers(src.model, size, context_length, *graph_paths, opset=opset, batch=batch)
    write_json(work / "config.json", src.model_config)
    write_json(work / "visual" / "preprocess_cfg.json", src.preprocess_cfg)
    family = family_for_config(src.model_config)
    source_tokenizer = load_source_tokenizer(src)
    _write_tokenizer_files(source_tokenizer, work / "textual", context_length)
    bundle = Bundle(work, src.model_config, src.preprocess_cfg, BundleMeta(family=family.name))
    tokenizer = family.tokenizer(bundle)

    graph_checks = {}
    if fuse_attention:
        graphs = {t: work / graph_relpath(t, "fp32") for t in ("visual", "textual")}
        graph_checks = optimize_towers(src.model, graphs, log)  # type: ignore[arg-type]  # both towers
    inputs = _check_inputs(src, source_tokenizer, tokenizer, batch, dynamic_text, check_images)
    _check_tokens(inputs, tokenizer.pad_id, family.name)
    reference = _torch_outputs(src, inputs)
    fp32 = _onnx_outputs(work, "fp32", inputs)
    checks: dict[str, dict[str, Any]] = {"fp32": _compare_fp32(reference, fp32)}
    if graph_checks:
        checks["graph"] = graph_checks
    log(_describe("fp32", checks["fp32"]))
    for precision in precisions[1:]:
        calibration = _calibration(src, inputs, calib_images, log) if precision == "int8-static" else {}
        for tower in ("visual", "textual"):
            src_graph, dst_graph = work / graph_relpath(tower, "fp32"), work / graph_relpath(tower, precision)
            lower(precision, src_graph, dst_graph, calibration.get(tower, ()))
        checks[precision] = _compare_lowered(precision, fp32, _onnx_outputs(work, precision, inputs))
        log(_describe(precision, checks[precision]))

    meta = BundleMeta(
        model=src.arch,
        pretrained=src.pretrained,
        logit_scale=src.logit_scale,
        logit_bias=src.logit_bias,
        family=family.name,
        normalized=False,
        opset=opset,
        batch=str(batch) if batch else "dynamic",
        precisions=precisions,
        source_sha256=src.source_sha256,
        checks=checks,
    )
    meta_dict = meta.to_dict()
    meta_dict["dynamic_text_length"] = dynamic_text
    write_json(work / "clipworks.json", meta_dict)
    return ExportReport(work, src.arch, src.pretrained, precisions, checks)


def _read_calibration(
    src: SourceModel, images: Sequence[Path] | None, size: int, texts: Path | None, log: Callable[[str], None]
) -> CalibrationSet:
    if images is None:
        log("warning: calibrating on the sample photos shipped with clipworks; pass --calib-images with photos "
            "like the ones the device will see")  # fmt: skip
    paths = list(images) if images is not None else sorted(p for p in CHECK_IMAGES.iterdir() if p.suffix == ".jpg")
    source = f"{len(paths)} given files" if images is not None else "the sample photos shipped with clipworks"
    return read_calibration_set(src.preprocess_cfg, images=paths, images_source=source, size=size, texts_file=texts,
                                log=log)  # fmt: skip


def _finish_target(
    src: SourceModel,
    work: Path,
    edge: Target,
    batch: int,
    calibration: CalibrationSet,
    compare_with: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Check the static graphs against the target's rules (and a dynamic bundle), then write ``work/<target>/``."""
    import onnx

    from clipworks.models.bundle import load_bundle

    bundle = load_bundle(work)
    job = TargetJob(
        folder=work / edge.name,
        batch=batch,
        image_size=(int(src.preprocess_cfg["size"][0]), int(src.preprocess_cfg["size"][1])),
        context_length=bundle.context_length,
        calibration=calibration,
        model_name=f"{src.arch}::{src.pretrained}",
    )
    for tower in ("visual", "textual"):
        path = work / graph_relpath(tower, "fp32")
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportCheckFailed(f"the {edge.name} {tower} graph fails onnx.checker: {str(e)[:300]}") from e
        problems = edge.violations(onnx.load(str(path), load_external_data=False), tower, job)  # type: ignore[arg-type]
        if problems:
            raise ExportCheckFailed(f"the {tower} graph breaks {edge.compiler}'s rules: {'; '.join(problems)}; "
                                    "please report the model")  # fmt: skip
    checks: dict[str, Any] = {"target": edge.rules()}
    if compare_with is not None:
        checks["dynamic"] = compare_bundles(work, compare_with)
        diff = checks["dynamic"]
        log(f"check {edge.name} vs dynamic {compare_with}: max |diff| image {diff['visual_max_abs_diff']:.2e}, "
            f"text {diff['textual_max_abs_diff']:.2e} (normalised; limit {FP32_TOLERANCE:.0e})  ok")  # fmt: skip
    calibration.tokenize(family_for_config(src.model_config).tokenizer(bundle))
    edge.write(job)
    log(f"wrote {edge.compiler} files in {edge.name}/: see {edge.name}/COMPILE.md for the commands to run next")
    meta_path = work / "clipworks.json"
    meta = json.loads(meta_path.read_text())
    meta["target"] = edge.name
    meta["checks"].update(checks)
    write_json(meta_path, meta)
    return checks


def compare_bundles(static: Path, dynamic: Path) -> dict[str, float]:
    """Max abs difference of normalised fp32 embeddings between two bundles of the same weights, in ONNX Runtime.

    Both run the check photos and prompts, at the static bundle's batch and text length (a dynamic graph takes
    any); over ``FP32_TOLERANCE`` is an ``ExportCheckFailed``.
    """
    from clipworks.models.bundle import load_bundle
    from clipworks.runtime.sessions import CpuBackend, OrtSession

    a, b = load_bundle(static), load_bundle(dynamic)
    if a.meta.source_sha256 != b.meta.source_sha256:
        raise UsageError(f"{dynamic} was exported from other weights than this export; compare bundles of one model")
    sessions = {
        name: {t: OrtSession(x.graph(t, "fp32"), CpuBackend()) for t in ("visual", "textual")}  # type: ignore[arg-type]
        for name, x in (("static", a), ("dynamic", b))
    }
    static_visual, static_text = sessions["static"]["visual"], sessions["static"]["textual"]
    from clipworks.imaging import PreprocessConfig, load_image, preprocess

    cfg = PreprocessConfig.from_dict(a.preprocess_cfg)
    photos = sorted(p for p in CHECK_IMAGES.iterdir() if p.suffix == ".jpg")
    pixels = np.stack([preprocess(load_image(p), cfg) for p in photos])
    pixels = np.resize(pixels, (static_visual.input_shape[0], *pixels.shape[1:]))
    tokenizer = family_for_config(a.config).tokenizer(a)
    prompts = [CHECK_PROMPTS[i % len(CHECK_PROMPTS)] for i in range(static_text.input_shape[0])]
    ids = tokenizer.encode(prompts, pad_to=a.context_length)
    result = {}
    for tower, feed in (("visual", pixels), ("textual", ids)):
        got = [l2_normalize(sessions[name][tower].run(feed)) for name in ("static", "dynamic")]
        result[f"{tower}_max_abs_diff"] = float(np.abs(got[0] - got[1]).max())
    for tower in ("visual", "textual"):
        if not result[f"{tower}_max_abs_diff"] <= FP32_TOLERANCE:
            raise ExportCheckFailed(
                f"the static {tower} graph differs from the dynamic one in {dynamic} by "
                f"{result[f'{tower}_max_abs_diff']:.2e} (limit {FP32_TOLERANCE:.0e}); please report the model"
            )
    return result


def _write_tokenizer_files(source_tokenizer: Any, textual_dir: Path, context_length: int) -> None:
    """The files of the tokenizer open_clip itself uses: Hugging Face's (SigLIP, multilingual) or CLIP's BPE."""
    if is_hf_tokenizer(source_tokenizer):
        write_hf_tokenizer_files(source_tokenizer, textual_dir, context_length)
    else:
        from clipworks.export.tokenizer_files import write_tokenizer_files

        write_tokenizer_files(textual_dir, context_length)


@dataclass
class _CheckInputs:
    images: np.ndarray  # (B, 3, H, W) float32, open_clip's own preprocessing
    prompts: list[str]
    torch_tokens: np.ndarray  # (B, context_length), open_clip's tokenizer for the model
    onnx_tokens: np.ndarray  # (B, L), the bundle's tokenizer, padded only to the longest prompt when allowed


def _check_inputs(
    src: SourceModel,
    source_tokenizer: Any,
    tokenizer: TextTokenizer,
    batch: int | None,
    dynamic_text: bool,
    check_images: Sequence[Path] | None,
) -> _CheckInputs:
    import open_clip
    from PIL import Image

    paths = list(check_images) if check_images else sorted(p for p in CHECK_IMAGES.iterdir() if p.suffix == ".jpg")
    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(
        tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"],
        resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg["fill_color"],
    )  # fmt: skip
    images = np.stack([transform(Image.open(p)).numpy() for p in paths]).astype(np.float32)
    prompts = list(CHECK_PROMPTS)
    if batch is not None:  # a static graph takes exactly `batch` rows
        images = np.resize(images, (batch, *images.shape[1:]))
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
    torch_tokens = source_tokenizer(prompts).numpy()
    onnx_tokens = tokenizer.encode(prompts, pad_to=None if dynamic_text else tokenizer.context_length)
    return _CheckInputs(images, prompts, torch_tokens, onnx_tokens)


def _check_tokens(inputs: _CheckInputs, pad_id: int, family: str) -> None:
    """The bundle's tokenizer must give open_clip's ids, else the text check below would compare other prompts."""
    ours = inputs.onnx_tokens
    theirs = inputs.torch_tokens
    if ours.shape[1] < theirs.shape[1]:  # rows cut to the longest prompt: the rest is padding
        padding = np.full((len(ours), theirs.shape[1] - ours.shape[1]), pad_id, dtype=ours.dtype)
        ours = np.concatenate([ours, padding], axis=1)
    for prompt, a, b in zip(inputs.prompts, ours, theirs, strict=True):
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ExportCheckFailed(
                f"the exported {family} tokenizer gives other token ids than open_clip for {prompt!r} "
                f"({a[:8].tolist()}... vs {b[:8].tolist()}...); this tokenizer does not export faithfully - "
                "please report it"
            )


def _calibration(
    src: SourceModel, inputs: _CheckInputs, calib_images: Sequence[Path] | None, log: Callable[[str], None]
) -> dict[str, list[np.ndarray]]:
    """Static int8's calibration batches: photos for the image tower, the check prompts for the text tower."""
    paths = list(calib_images) if calib_images else sorted(p for p in CHECK_IMAGES.iterdir() if p.suffix == ".jpg")
    pixels = calibration_pixels(paths, src.preprocess_cfg, log=log)
    log(f"calibrating int8-static on {len(pixels)} photos")
    rows = inputs.images.shape[0]  # a static-batch graph takes exactly this many rows
    return {
        "visual": [np.resize(pixels[i : i + rows], (rows, *pixels.shape[1:])) for i in range(0, len(pixels), rows)],
        "textual": [inputs.onnx_tokens],
    }


def _torch_outputs(src: SourceModel, inputs: _CheckInputs) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        image = src.model.encode_image(torch.from_numpy(inputs.images)).numpy()
        text = src.model.encode_text(torch.from_numpy(inputs.torch_tokens).long()).numpy()
    return {"visual": image, "textual": text}


def _onnx_outputs(work: Path, precision: str, inputs: _CheckInputs) -> dict[str, np.ndarray]:
    from clipworks.runtime.sessions import CpuBackend, OrtSession

    visual = OrtSession(work / graph_relpath("visual", precision), CpuBackend())
    textual = OrtSession(work / graph_relpath("textual", precision), CpuBackend())
    return {"visual": visual.run(inputs.images), "textual": textual.run(inputs.onnx_tokens)}


def _compare_fp32(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    result: dict[str, float] = {}
    for tower in ("visual", "textual"):
        ref, out = reference[tower], got[tower]
        result[f"{tower}_max_abs_diff"] = float(np.abs(l2_normalize(ref) - l2_normalize(out)).max())
        result[f"{tower}_max_abs_diff_raw"] = float(np.abs(ref - out).max())
        result[f"{tower}_max_abs_raw"] = float(np.abs(ref).max())
    for tower in ("visual", "textual"):
        diff = result[f"{tower}_max_abs_diff"]
        if not diff <= FP32_TOLERANCE:  # also catches NaN
            raise ExportCheckFailed(
                f"fp32 {tower} graph differs from open_clip by {diff:.2e} (limit {FP32_TOLERANCE:.0e}) "
                "on normalised embeddings; this architecture does not export faithfully - please report it"
            )
    return result


def _compare_lowered(precision: str, fp32: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    floor = COSINE_FLOORS[precision]
    result: dict[str, Any] = {"floor": floor}
    for tower in ("visual", "textual"):
        cosine = np.sum(l2_normalize(fp32[tower]) * l2_normalize(got[tower]), axis=-1)
        result[f"{tower}_min_cosine"] = float(cosine.min())
        result[f"{tower}_mean_cosine"] = float(cosine.mean())
    for tower in ("visual", "textual"):
        worst = result[f"{tower}_min_cosine"]
        if not worst >= floor:
            raise ExportCheckFailed(
                f"{precision} {tower} graph reaches cosine {worst:.4f} to fp32, under the floor {floor}; "
                f"export without {precision} or report the architecture"
            )
    return result


def _describe(precision: str, check: dict[str, float]) -> str:
    if precision == "fp32":
        return (
            f"check fp32 vs open_clip: max |diff| image {check['visual_max_abs_diff']:.2e}, "
            f"text {check['textual_max_abs_diff']:.2e} (normalised; limit {FP32_TOLERANCE:.0e})  ok"
        )
    return (
        f"check {precision} vs fp32: cosine image min {check['visual_min_cosine']:.5f}, "
        f"text min {check['textual_min_cosine']:.5f} (floor {check['floor']})  ok"
    )


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap the finished bundle in, so ``dst`` is never a half-written bundle."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def default_export_name(arch: str, pretrained: str) -> str:
    return f"{arch}__{RANDOM if pretrained == RANDOM else Path(pretrained).stem}"
