"""``clipworks models list|pull|info``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, ThreadsOpt
from clipworks.errors import UsageError, status
from clipworks.models.bundle import DEFAULT_PRECISIONS

app = typer.Typer(help="List, pull and inspect model bundles.", no_args_is_help=True)

EXPORT_ONLY = "export-only"  # `models list` for a name without a ready bundle: the export extra makes one


@app.command("list")
def list_(
    family: Annotated[
        str | None, typer.Option(help="Only models of this family (clip, siglip, ...: see `models list`).")
    ] = None,
    downloadable: Annotated[bool, typer.Option(help="Only models with a ready ONNX bundle on the hub.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Known models and cached bundles: family, dimension, where a ready bundle comes from (or export-only), and
    whether it is cached. Exports that are not in the registry (``ARCH::random``) are listed when cached."""
    from clipworks.models.family import FAMILIES

    if family is not None and family not in FAMILIES:
        raise UsageError(f"--family {family!r} is not a model family; choose from {', '.join(sorted(FAMILIES))}")
    rows = [*map(_record_row, _records()), *_unlisted_cached_rows()]
    rows = [r for r in rows if (family is None or r["family"] == family) and (r["hub_repo"] or not downloadable)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        status("no model matches")
        return
    sources = [r["hub_repo"] or EXPORT_ONLY for r in rows]
    name_w = max(len(r["name"]) for r in rows)
    source_w = max(map(len, sources))
    family_w = max(len("family"), *(len(r["family"]) for r in rows))
    print(
        f"{'name':{name_w}}  {'alias':14} {'family':{family_w}} {'dim':>5} {'size':>5}  "
        f"{'ready bundle':{source_w}}  cached"
    )
    for r, source in zip(rows, sources, strict=True):
        cached = r["cached"] or ("incomplete: pull again" if r["incomplete"] else "-")
        print(
            f"{r['name']:{name_w}}  {', '.join(r['aliases']):14} {r['family']:{family_w}} {r['dim']:>5} "
            f"{r['image_size']:>5}  {source:{source_w}}  {cached}"
        )


def _records() -> list[Any]:
    from clipworks.models.registry import list_models

    return list_models()


def _record_row(record: Any) -> dict[str, Any]:
    from clipworks.errors import BadBundle
    from clipworks.models.registry import parse_model_name
    from clipworks.models.store import find_local

    incomplete = None
    try:
        local = find_local(parse_model_name(record.name))
    except BadBundle as e:
        local, incomplete = None, str(e)
    return {
        "name": record.name,
        "aliases": list(record.aliases),
        "family": record.family,
        "dim": record.embed_dim,
        "image_size": record.image_size,
        "licence": record.licence,
        "source": record.source,  # where open_clip gets the weights an export starts from
        # The hub repository of Immich's ready ONNX bundle; None: export-only (needs the export extra).
        "hub_repo": record.hf_repo,
        "cached": str(local) if local else None,
        "incomplete": incomplete,
    }


def _unlisted_cached_rows() -> list[dict[str, Any]]:
    """Bundles in the clipworks cache that no record names: ``ARCH::random`` and other exported tags."""
    from clipworks import settings
    from clipworks.errors import BadBundle
    from clipworks.models.bundle import is_bundle_dir, load_bundle
    from clipworks.models.family import family_for
    from clipworks.models.registry import SEPARATOR

    listed = {record.dirname for record in _records()}
    root = settings.models_dir()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in listed) if root.is_dir() else []
    rows = []
    for folder in folders:
        if "__" not in folder.name or not is_bundle_dir(folder):
            continue  # not a cached bundle (a partial export's work folder starts with ".")
        arch, _, tag = folder.name.partition("__")
        row: dict[str, Any] = {"name": f"{arch}{SEPARATOR}{tag}", "aliases": [], "family": "?", "dim": "?",
                               "image_size": "?", "licence": None, "source": None, "hub_repo": None,
                               "cached": None, "incomplete": None}  # fmt: skip
        try:
            bundle = load_bundle(folder)
            size = bundle.preprocess_cfg["size"]
            row.update(family=family_for(bundle).name, dim=bundle.embed_dim, cached=str(folder),
                       image_size=size[0] if isinstance(size, list) else size)  # fmt: skip
        except BadBundle as e:
            row["incomplete"] = str(e)
        rows.append(row)
    return rows


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Model name, e.g. ViT-B-32::openai or ViT-B/32.")],
    source: Annotated[str, typer.Option(help="auto (export if torch is installed, else hub), hub or export.")] = "auto",
    precision: Annotated[str, typer.Option(help="Precisions to export (export source only).")] = ",".join(
        DEFAULT_PRECISIONS
    ),
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
