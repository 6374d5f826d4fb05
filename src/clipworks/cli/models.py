"""``clipworks models list|pull|info``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, ThreadsOpt

app = typer.Typer(help="List, pull and inspect model bundles.", no_args_is_help=True)

EXPORT_ONLY = "export-only"  # `models list` for a name without a ready bundle: the export extra makes one


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Known models: dimension, where a ready bundle comes from (or export-only), and whether it is cached."""
    from clipworks.errors import BadBundle
    from clipworks.models.registry import list_models, parse_model_name
    from clipworks.models.store import find_local

    rows = []
    for record in list_models():
        incomplete = None
        try:
            local = find_local(parse_model_name(record.name))
        except BadBundle as e:
            local, incomplete = None, str(e)
        rows.append(
            {
                "name": record.name,
                "aliases": list(record.aliases),
                "dim": record.embed_dim,
                "image_size": record.image_size,
                # The hub repository of Immich's ready ONNX bundle; None: export-only (needs the export extra).
                "hub_repo": record.hf_repo,
                "cached": str(local) if local else None,
                "incomplete": incomplete,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    sources = [r["hub_repo"] or EXPORT_ONLY for r in rows]
    name_w = max(len(r["name"]) for r in rows)
    source_w = max(map(len, sources))
    print(f"{'name':{name_w}}  {'alias':14} {'dim':>5} {'size':>5}  {'ready bundle':{source_w}}  cached")
    for r, source in zip(rows, sources, strict=True):
        cached = r["cached"] or ("incomplete: pull again" if r["incomplete"] else "-")
        print(
            f"{r['name']:{name_w}}  {', '.join(r['aliases']):14} {r['dim']:>5} {r['image_size']:>5}  "
            f"{source:{source_w}}  {cached}"
        )


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Model name, e.g. ViT-B-32::openai or ViT-B/32.")],
    source: Annotated[str, typer.Option(help="auto (export if torch is installed, else hub), hub or export.")] = "auto",
    precision: Annotated[str, typer.Option(help="Precisions to export (export source only).")] = "fp32,int8",
    force: Annotated[bool, typer.Option(help="Fetch again even if cached.")] = False,
) -> None:
    """Put a model into the cache: Immich's ONNX bundle from the hub, or an export of open_clip's weights.

    Export-only names (see `models list`) need the export extra.
    """
    from clipworks.models.store import pull as pull_model

    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    path = pull_model(name, source=source, precisions=precisions, force=force)
    print(path)


@app.command()
def info(
    name: Annotated[str, typer.Argument(help="Model name, hf-hub:ORG/REPO, local-dir:PATH or bundle path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Where a model lives, its dimension, precisions and export checks, and the backend it runs on here:
    the provider and the options ONNX Runtime reports for the image session."""
    from clipworks.models.store import ensure_bundle
    from clipworks.runtime.encoder import ClipModel

    bundle = ensure_bundle(name, download=False)
    model = ClipModel(bundle, device=device, precision=precision, threads=threads)
    data = {
        "name": bundle.name,
        "path": str(bundle.root),
        "embed_dim": bundle.embed_dim,
        "image_size": bundle.preprocess_cfg.get("size"),
        "context_length": bundle.context_length,
        "logit_scale": bundle.meta.logit_scale,
        "normalized_outputs": bundle.meta.normalized,
        "visual_precisions": bundle.available_precisions("visual"),
        "textual_precisions": bundle.available_precisions("textual"),
        "batch": bundle.meta.batch,
        "source_sha256": bundle.meta.source_sha256,
        "checks": bundle.meta.checks,
        "precision": model.precision,
        "runtime": model.visual.applied_options(),
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    runtime = data.pop("runtime")
    rows = [*data.items(), *((f"runtime.{key}", value) for key, value in runtime.items())]
    for key, value in rows:
        print(f"{key:24} {json.dumps(value) if isinstance(value, dict | list) else value}")
