"""``clipworks classify`` (zero-shot labels) and ``clipworks interrogate`` (tags, categories)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from clipworks.cli.common import MODEL_DEFAULT, DeviceOpt, ModelOpt, PrecisionOpt, ThreadsOpt, info, load_model
from clipworks.cli.index import DbOpt, open_library, write_sidecar_files
from clipworks.display import quote_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.imaging import is_image_path

ImagesArg = Annotated[list[str], typer.Argument(help="Image files and/or folders (searched recursively).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _split_images(args: list[str], labels_given: bool) -> tuple[list[str], list[str]]:
    """Images, and the labels that followed ``--labels`` (``--labels "a dog" "a cat"``).

    Click gives an option one value, so the second and later labels arrive as positional arguments: with
    ``--labels`` given, an argument that is neither an existing path nor named like an image is a label.
    """
    images, extra = [], []
    for arg in args:
        if Path(arg).expanduser().exists() or is_image_path(arg) or not labels_given:
            images.append(arg)
        else:
            extra.append(arg)
    if not images:
        raise UsageError("no images given; pass image files or folders before --labels")
    return images, extra


def _embed(clip: Any, inputs: list[str]) -> tuple[list[str], Any]:
    from clipworks.pipeline import collect_image_files, embed_files

    files = collect_image_files(inputs)
    result = embed_files(clip, files)
    if not result.paths:
        raise ClipworksError(f"none of the {len(files)} files could be read as an image")
    return result.paths, result.embeddings


def classify(
    images: ImagesArg,
    labels: Annotated[
        list[str] | None,
        typer.Option("--labels", "-l", help='Labels: --labels "a dog" "a cat" (or repeat --labels).'),
    ] = None,
    labels_file: Annotated[Path | None, typer.Option(help="A file of labels, one a line.")] = None,
    template: Annotated[str, typer.Option(help="Prompt template; {} is the label.")] = "a photo of a {}.",
    top_k: Annotated[int, typer.Option(min=1, help="Labels shown per image.")] = 5,
    as_json: JsonOpt = False,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Zero-shot classify images: the model's probabilities over the labels (CLIP: softmax of logit_scale *
    cosine), best first."""
    from clipworks.labelbank import LabelBank, check_labels
    from clipworks.zeroshot import classify_embeddings, format_prediction_table, load_labels_file

    inputs, extra = _split_images(images, bool(labels))
    if bool(labels) == bool(labels_file):
        raise UsageError("give the labels with --labels or --labels-file (exactly one of them)")
    all_labels = [*labels, *extra] if labels else load_labels_file(labels_file)  # type: ignore[arg-type]
    # A bad label or template fails now, before the model loads.
    LabelBank.prompts(check_labels(all_labels, "--labels"), [template])
    clip = load_model(model, device, precision, threads)
    paths, image_emb = _embed(clip, inputs)
    rows = classify_embeddings(LabelBank.build(clip, all_labels, [template]), image_emb, top_k)
    if as_json:
        out = [{"image": p, "results": [s.to_dict() for s in row]} for p, row in zip(paths, rows, strict=True)]
        print(json.dumps(out, indent=2))
        return
    for i, (path, row) in enumerate(zip(paths, rows, strict=True)):
        if i:
            print()
        print(quote_path(path))
        print(format_prediction_table((s.logit, s.prob, s.label) for s in row), end="")


def interrogate(
    images: ImagesArg,
    tags_file: Annotated[Path | None, typer.Option(help="Tag vocabulary, one tag a line.")] = None,
    vocabulary: Annotated[str | None, typer.Option(help="A shipped vocabulary: imagenet1k (the default).")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine a tag must reach to join the caption.")] = 0.22,
    top: Annotated[int, typer.Option(min=1, help="Most tags in a caption.")] = 10,
    template: Annotated[str, typer.Option(help="Template for tags; '{}' uses them as written.")] = "{}",
    categories: Annotated[
        Path | None,
        typer.Option(help='Structured output: a JSON file {"category": ["label", ...], ...}; one winner each.'),
    ] = None,
    category_template: Annotated[str, typer.Option(help="Template for category labels.")] = "a photo of a {}.",
    cache: Annotated[bool, typer.Option(help="Read and write cached tag embeddings.")] = True,
    write_tags: Annotated[
        bool,
        typer.Option(
            "--write-tags",
            help="Store each image's tags and scores in the library (--db), in place of "
            "the tags it had: `search --tag TAG` filters by them. Images must be indexed already.",
        ),
    ] = False,
    db: DbOpt = None,
    sidecar: Annotated[
        str | None,
        typer.Option(
            "--sidecar",
            help="Write the tags next to each image: txt (photo.txt, one comma-separated "
            "caption, as training sets use) or xmp (photo.jpg.xmp keywords, merged into one that exists).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace .txt sidecars that exist (default: keep them).")
    ] = False,
    as_json: JsonOpt = False,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Caption images with the tags whose cosine reaches --threshold (else the best tag), best first."""
    from clipworks import zeroshot
    from clipworks.library.sidecars import sidecar_format

    if tags_file is not None and vocabulary is not None:
        raise UsageError("give --tags-file or --vocabulary, not both")
    if sidecar is not None:
        sidecar_format(sidecar)  # a bad name fails before the model loads
    library = open_library(db, None) if write_tags else None
    tags = zeroshot.load_labels_file(tags_file) if tags_file else zeroshot.vocabulary(vocabulary or "imagenet1k")
    cats = zeroshot.load_categories(categories) if categories else None
    clip = load_model(model, device, precision, threads)
    index = zeroshot.TagIndex.build(clip, tags, template=template, use_cache=cache)
    if index.bank.cache_path is not None:
        how = "read from" if index.bank.from_cache else "cached in"
        info(f"{len(index.tags)} tags {how} {index.bank.cache_path}")
    paths, emb = _embed(clip, images)
    found = index.interrogate(emb, threshold, top)
    structured = zeroshot.CategorySet.build(clip, cats, template=category_template).evaluate(emb) if cats else None
    if library is not None:
        missing = library.write_tags(
            [(p, [(t.tag, t.score) for t in it.tags]) for p, it in zip(paths, found, strict=True)]
        )
        info(f"stored the tags of {len(paths) - len(missing)} images in {library.path}")
        for path in missing:
            info(f"warning: {quote_path(path)} is not in the library, so its tags were not stored: index it first")
    if sidecar is not None:
        write_sidecar_files(
            [(p, [t.tag for t in it.tags]) for p, it in zip(paths, found, strict=True)], sidecar, overwrite
        )
    out = []
    for i, (path, it) in enumerate(zip(paths, found, strict=True)):
        item: dict[str, Any] = {"image": path, **it.to_dict()}
        if structured is not None:
            item["results"] = {name: r.to_dict() for name, r in structured[i].items()}
        out.append(item)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    for item in out:
        print(f"{quote_path(item['image'])}: {item['caption']}")
        for name, r in item.get("results", {}).items():
            print(f"  {name}: {r['winner']} ({r['confidence']:.3f})")
