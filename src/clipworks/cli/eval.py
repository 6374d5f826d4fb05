"""``clipworks eval zeroshot`` (zero-shot top-1/top-5, per class, per precision) and ``clipworks eval probe``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from clipworks.cli.common import MODEL_DEFAULT, DeviceOpt, ModelOpt, PrecisionOpt, ThreadsOpt, info, load_model
from clipworks.errors import UsageError

app = typer.Typer(help="Measure a model: zero-shot accuracy and the CLIP paper's linear probe.", no_args_is_help=True)

DatasetArg = Annotated[
    str,
    typer.Argument(
        help="A CIFAR folder or file (cifar-10-batches-py/test_batch, cifar-100-python/test), an image folder "
        "of class sub-folders (class/xxx.jpg), or a .csv/.json of path,label."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]


def _precisions(text: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    allowed = {"fp32", "fp16", "int8"}
    if not items or any(p not in allowed for p in items) or len(set(items)) != len(items):
        raise UsageError(f"--compare takes distinct precisions from fp32, fp16, int8 separated by commas, not {text!r}")
    return items


def _skipped_line(count: int, total: int) -> str:
    return f"skipped {count} of {total} images that could not be read (named above)" if count else ""


@app.command("zeroshot")
def zeroshot(
    dataset: DatasetArg,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Class names, one a line (the dataset's names, or exactly as many in its class order), or a "
            "shipped set: cifar10, cifar100, imagenet1k. Default: the dataset's own names.",
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            "--templates",
            help="Prompt templates with {} for the class, one a line, or a shipped set's (cifar10, cifar100, "
            "imagenet1k). Default: the set's when the classes are a shipped set's, else 'a photo of a {}.'.",
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="For a CIFAR folder: test or train.")] = "test",
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare", help="Precisions to compare, e.g. fp32,int8,fp16: accuracy lost by each vs the first."
        ),
    ] = None,
    worst: Annotated[int, typer.Option(min=0, help="Worst classes shown with what they were taken for.")] = 5,
    per_class: Annotated[bool, typer.Option("--per-class", help="Print every class's accuracy.")] = False,
    as_json: JsonOpt = False,
    batch_size: BatchOpt = 32,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Zero-shot top-1 and top-5 accuracy of a model on labelled images (CLIP's prompt ensemble over the classes)."""
    from clipworks.eval.datasets import load_dataset, load_lines, match_classes, shipped_set
    from clipworks.eval.embed import embed_dataset
    from clipworks.eval.zeroshot import zeroshot_accuracy
    from clipworks.labelbank import LabelBank

    if split not in ("test", "train"):
        raise UsageError(f"--split must be test or train, not {split!r}")
    precisions = _precisions(compare) if compare else [precision]
    data = load_dataset(dataset, split)
    given = load_lines(classes, lambda name: shipped_set(name)[0]) if classes else None
    match = match_classes(data, given)
    prompts = load_lines(templates, lambda name: shipped_set(name)[1]) if templates else match.templates
    LabelBank.prompts(match.prompt_names, prompts)  # a template without {} fails before any model loads
    if match.how == "in order":
        info(f"--classes names none of the dataset's classes: taking its {len(match.prompt_names)} lines in the "
             f"dataset's class order ({data.class_names[0]!r} is {match.prompt_names[0]!r})")  # fmt: skip
    runs: list[tuple[str, Any, int]] = []
    for p in precisions:
        clip = load_model(model, device, p, threads)
        embedded = embed_dataset(clip, data, batch_size=batch_size)
        result = zeroshot_accuracy(
            clip, embedded.embeddings, match.column[embedded.labels], match.prompt_names, prompts
        )
        runs.append((clip.precision, result, len(embedded.skipped)))
    if compare:
        _print_comparison(runs, as_json)
    else:
        _print_zeroshot(data.source, runs[0], worst, per_class, as_json)
    skipped = runs[0][2]
    if skipped:
        info(_skipped_line(skipped, len(data)))


def _print_zeroshot(source: str, run: tuple[str, Any, int], worst: int, per_class: bool, as_json: bool) -> None:
    used, result, skipped = run
    if as_json:
        print(json.dumps({"dataset": source, "precision": used, "skipped": skipped, **result.to_dict(worst)}, indent=2))
        return
    print(f"{source}: {result.n} images, {result.classes} classes, {result.templates} templates, {used}")
    print(f"top-1  {result.top1:.4f}")
    print(f"top-5  {result.top5:.4f}")
    rows = result.per_class if per_class else result.worst(worst)
    if rows:
        print("per class:" if per_class else f"worst {len(rows)} classes:")
        width = max(len(c.name) for c in rows)
        for c in rows:
            confused = ", ".join(f"{name} {count}" for name, count in c.confused_with)
            tail = f"  taken for {confused}" if confused else ""
            print(f"  {c.name:<{width}}  {c.top1:.3f} ({c.n} images){tail}")


def _print_comparison(runs: list[tuple[str, Any, int]], as_json: bool) -> None:
    base_precision, base, _ = runs[0]
    rows = [
        {"precision": p, "top1": r.top1, "top5": r.top5, "n": r.n,
         "lost_top1": base.top1 - r.top1, "lost_top5": base.top5 - r.top5}
        for p, r, _ in runs
    ]  # fmt: skip
    if as_json:
        print(json.dumps({"top1": base.top1, "top5": base.top5, "n": base.n, "baseline": base_precision,
                          "compare": rows}, indent=2))  # fmt: skip
        return
    print(f"{'precision':<10}{'top-1':>8}{'top-5':>8}{'lost top-1':>12}{'lost top-5':>12}")
    for row in rows:
        print(f"{row['precision']:<10}{row['top1']:>8.4f}{row['top5']:>8.4f}"
              f"{row['lost_top1']:>+12.4f}{row['lost_top5']:>+12.4f}")  # fmt: skip


@app.command("probe")
def probe(
    dataset: DatasetArg,
    test: Annotated[
        str | None,
        typer.Option(
            "--test",
            help="Test images (same layouts). Default: a CIFAR folder's test files, else --test-fraction of DATASET.",
        ),
    ] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of DATASET held out for testing, per class.")] = 0.3,
    validation_fraction: Annotated[
        float, typer.Option(help="Share of the training images held out to choose C, per class.")
    ] = 0.2,
    c: Annotated[
        float | None, typer.Option("--c", help="Use this C (inverse regularisation) instead of the sweep.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the splits and the solver.")] = 0,
    as_json: JsonOpt = False,
    batch_size: BatchOpt = 32,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Linear-probe accuracy as in the CLIP paper: logistic regression on the image embeddings, C swept on a
    validation split, scored on held-out test images."""
    from clipworks.eval.datasets import has_train_split, load_dataset, match_classes
    from clipworks.eval.embed import embed_dataset
    from clipworks.eval.probe import DEFAULT_C_GRID, fit_probe, split_train_test
    from clipworks.extras import require

    require("sklearn", "eval", "clipworks eval probe")

    for flag, fraction in (("--test-fraction", test_fraction), ("--validation-fraction", validation_fraction)):
        if not 0 < fraction < 1:
            raise UsageError(f"{flag} must be between 0 and 1, not {fraction}")
    if c is not None and c <= 0:
        raise UsageError(f"--c must be positive, not {c}")
    own_split = test is None and has_train_split(dataset)
    train_data = load_dataset(dataset, "train" if own_split else "test")
    test_data = load_dataset(dataset, "test") if own_split else (load_dataset(test) if test else None)
    # The test set's classes, by name, in the training set's numbering (every one must be among them).
    column = match_classes(test_data, train_data.class_names, "the training classes").column if test_data else None
    clip = load_model(model, device, precision, threads)
    train = embed_dataset(clip, train_data, batch_size=batch_size)
    skipped = len(train.skipped)
    if test_data is not None and column is not None:
        held = embed_dataset(clip, test_data, batch_size=batch_size)
        skipped += len(held.skipped)
        train_x, train_y, test_x, test_y = train.embeddings, train.labels, held.embeddings, column[held.labels]
    else:
        fit_idx, test_idx = split_train_test(train.labels, test_fraction, seed, "test")
        train_x, train_y = train.embeddings[fit_idx], train.labels[fit_idx]
        test_x, test_y = train.embeddings[test_idx], train.labels[test_idx]
    result = fit_probe(
        train_x, train_y, test_x, test_y, seed=seed, validation_fraction=validation_fraction,
        c_grid=DEFAULT_C_GRID if c is None else (c,),
    )  # fmt: skip
    if as_json:
        print(json.dumps({"dataset": train_data.source, "precision": clip.precision, "skipped": skipped,
                          **result.to_dict()}, indent=2))  # fmt: skip
    else:
        held_out = f" ({result.validation} of them held out to choose C)" if result.validation else ""
        print(f"{train_data.source}: {result.train} training images{held_out}, {result.test} test images, "
              f"{len(train_data.class_names)} classes, {clip.precision}")  # fmt: skip
        print(f"C      {result.c:g}")
        print(f"top-1  {result.top1:.4f}")
        print(f"top-5  {result.top5:.4f}")
    if skipped:
        info(_skipped_line(skipped, len(train_data) + (len(test_data) if test_data else 0)))
