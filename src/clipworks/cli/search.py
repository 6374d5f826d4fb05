"""``clipworks search``, ``clipworks similar`` and ``clipworks duplicates`` over the photo library.

Text output is one photo a line, its name through ``clipworks.display.quote_path`` (a name with a newline,
a control character or bytes that are not UTF-8 prints as one bash ``$'...'`` string); ``--json`` is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, info
from clipworks.cli.index import AnnDtypeOpt, AnnOpt, DbOpt, LibraryModelOpt, open_library
from clipworks.display import quote_path
from clipworks.library.search import Hit

# `-people` and `-2:cat` are query terms, not options: no short options here, unknown ones pass through.
QUERY_CONTEXT = {"ignore_unknown_options": True}

TopKOpt = Annotated[int, typer.Option("--top-k", help="How many photos to list.")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Leave out photos below this cosine.")]
JsonOpt = Annotated[bool, typer.Option("--json", help='Print [{"path": ..., "score": ...}, ...].')]
ResultsOpt = Annotated[
    Path | None,
    typer.Option(
        "--results",
        help="Empty this folder and write the hits into it as 0.jpg, 1.jpg, ... in order, as robot CLIP's clip_manage "
        "does: links to JPEG photos, JPEG copies of the others.",
    ),
]


def render(hits: Sequence[Hit], as_json: bool, results: Path | None) -> None:
    from clipworks.library.results import write_results

    if results is not None:
        report = write_results(results, [h.path for h in hits])
        copies = f" ({report.converted} as JPEG copies)" if report.converted else ""
        info(f"wrote {len(hits)} photos into {results}{copies}")
        for path in report.undecodable:
            info(f"warning: {quote_path(path)} cannot be decoded; its result is a link to it, as the robot makes")
    if as_json:
        print(json.dumps([{"path": h.path, "score": round(h.score, 6)} for h in hits], indent=2))
        return
    for hit in hits:
        print(f"{hit.score:.4f}  {quote_path(hit.path)}")


def search(
    query: Annotated[
        list[str] | None,
        typer.Argument(help="Words of the query; +word or -word for extra or negative terms, 2:word to weight one."),
    ] = None,
    top_k: TopKOpt = 10,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="Search by example photo (repeatable; combines with text).")
    ] = None,
    negative: Annotated[list[str] | None, typer.Option("--not", help="A text to steer away from (repeatable).")] = None,
    threshold: ThresholdOpt = None,
    as_json: JsonOpt = False,
    results: ResultsOpt = None,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    ann: AnnOpt = "auto",
    ann_dtype: AnnDtypeOpt = "f16",
) -> None:
    """Find photos by text, by example image, or both; scores are cosine similarities, highest first."""
    from clipworks.errors import UsageError

    if not query and not image:
        raise UsageError("give a text query, --image PATH, or both")
    library = open_library(db, model, device=device, precision=precision, ann=ann, ann_dtype=ann_dtype)
    hits = library.search(query or [], images=[str(i) for i in image or []], negatives=negative or [],
                          top_k=top_k, threshold=threshold)  # fmt: skip
    render(hits, as_json, results)


def similar(
    path: Annotated[Path, typer.Argument(help="A photo (in the library or not).")],
    top_k: TopKOpt = 10,
    threshold: ThresholdOpt = None,
    as_json: JsonOpt = False,
    results: ResultsOpt = None,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
    ann: AnnOpt = "auto",
    ann_dtype: AnnDtypeOpt = "f16",
) -> None:
    """List the photos most like one photo: near-duplicates first, then visually similar ones."""
    hits = open_library(db, model, ann=ann, ann_dtype=ann_dtype).similar(path, top_k=top_k, threshold=threshold)
    render(hits, as_json, results)


def duplicates(
    threshold: Annotated[float, typer.Option("--threshold", help="Cosine at or above which photos group.")] = 0.95,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
) -> None:
    """Groups of near-duplicate photos over the whole library, largest group first."""
    groups = open_library(db, model).duplicates(threshold)
    if as_json:
        print(json.dumps([[{"path": h.path, "score": round(h.score, 6)} for h in g] for g in groups], indent=2))
        return
    for number, group in enumerate(groups, 1):
        print(f"group {number} ({len(group)} photos)")
        for hit in group:
            print(f"  {hit.score:.4f}  {quote_path(hit.path)}")
    info(f"{len(groups)} groups of near-duplicates at cosine >= {threshold}")
