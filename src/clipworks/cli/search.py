"""``clipworks search``, ``clipworks similar`` and ``clipworks duplicates`` over the photo library.

Text output is one photo a line, its name through ``clipworks.display.quote_path`` (a name with a newline,
a control character or bytes that are not UTF-8 prints as one bash ``$'...'`` string), a video moment as
``clip.mp4 @ 00:01:23.4``; ``--json`` is JSON (a moment's ``time`` in seconds, null for a photo).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, info
from clipworks.cli.index import AnnDtypeOpt, AnnOpt, DbOpt, LibraryModelOpt, StoreOpt, open_library
from clipworks.display import quote_path
from clipworks.library.metadata import Filters
from clipworks.library.search import Hit

# `-people` and `-2:cat` are query terms, not options: no short options here, unknown ones pass through.
QUERY_CONTEXT = {"ignore_unknown_options": True}

TopKOpt = Annotated[int, typer.Option("--top-k", help="How many photos to list.")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Leave out photos below this cosine.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help='Print [{"path": ..., "score": ..., "time": seconds or null}, ...].')
]
ResultsOpt = Annotated[
    Path | None,
    typer.Option(
        "--results",
        help="Empty this folder and write the hits into it as 0.jpg, 1.jpg, ... in order, as robot CLIP's clip_manage "
        "does: links to JPEG photos, JPEG copies of the others.",
    ),
]


AfterOpt = Annotated[
    str | None,
    typer.Option("--after", help="Only photos taken on or after this date (YYYY-MM-DD, or an ISO timestamp; "
                 "without an offset it is the local time where each photo was taken)."),
]  # fmt: skip
BeforeOpt = Annotated[
    str | None, typer.Option("--before", help="Only photos taken on or before this date (the whole day counts).")
]
CameraOpt = Annotated[
    str | None, typer.Option("--camera", help="Only photos whose camera make or model contains this text (any case).")
]
FolderOpt = Annotated[Path | None, typer.Option("--folder", help="Only photos under this folder (at any depth).")]
NearOpt = Annotated[
    str | None, typer.Option("--near", help="Only photos taken within KM kilometres of LAT,LON: --near 48.86,2.35,5.")
]
TagOpt = Annotated[
    str | None, typer.Option("--tag", help="Only photos given this tag by `interrogate --write-tags` (any case).")
]
TypeOpt = Annotated[str | None, typer.Option("--type", help="Only photos or only videos: photo or video.")]
SortOpt = Annotated[str, typer.Option("--sort", help="score (best first), or date: the same best hits, newest first.")]
OffsetOpt = Annotated[int, typer.Option("--offset", help="Skip this many of the best hits (the next page).")]


def filters_of(
    after: str | None,
    before: str | None,
    camera: str | None,
    folder: Path | None,
    near: str | None,
    kind: str | None,
    tag: str | None,
) -> Filters:
    """The search filters from their flags; a bad value stops with one line naming its flag."""
    from clipworks.library.metadata import make_filters

    return make_filters(after=after, before=before, camera=camera, folder=None if folder is None else str(folder),
                        near=near, kind=kind, tag=tag, names=lambda field: f"--{field}")  # fmt: skip


def render(hits: Sequence[Hit], as_json: bool, results: Path | None) -> None:
    from clipworks.display import clock
    from clipworks.library.results import write_results

    if results is not None:
        if any(h.time is not None for h in hits):
            from clipworks.errors import UsageError

            raise UsageError("--results writes photos; some hits are video moments: add --type photo")
        report = write_results(results, [h.path for h in hits])
        copies = f" ({report.converted} as JPEG copies)" if report.converted else ""
        info(f"wrote {len(hits)} photos into {results}{copies}")
        for path in report.undecodable:
            info(f"warning: {quote_path(path)} cannot be decoded; its result is a link to it, as the robot makes")
    if as_json:
        print(json.dumps([{"path": h.path, "score": round(h.score, 6), "time": h.time} for h in hits], indent=2))
        return
    for hit in hits:
        at = "" if hit.time is None else f" @ {clock(hit.time)}"
        print(f"{hit.score:.4f}  {quote_path(hit.path)}{at}")


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
    ann_dtype: AnnDtypeOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    camera: CameraOpt = None,
    folder: FolderOpt = None,
    near: NearOpt = None,
    kind: TypeOpt = None,
    tag: TagOpt = None,
    sort: SortOpt = "score",
    offset: OffsetOpt = 0,
    store: StoreOpt = None,
) -> None:
    """Find photos and moments in videos by text, by example image, or both; scores are cosine similarities,
    highest first. The filters choose which photos and videos are ranked at all."""
    from clipworks.errors import UsageError

    if not query and not image:
        raise UsageError("give a text query, --image PATH, or both")
    filters = filters_of(after, before, camera, folder, near, kind, tag)
    if store is not None:
        library = open_shared_library(store, model, device=device, precision=precision, ann=ann)
    else:
        library = open_library(db, model, device=device, precision=precision, ann=ann, ann_dtype=ann_dtype)
    hits = library.search(query or [], images=[str(i) for i in image or []], negatives=negative or [],
                          top_k=top_k, threshold=threshold, filters=filters, offset=offset,
                          sort=sort)  # type: ignore[arg-type]  # fmt: skip
    render(hits, as_json, results)


def open_shared_library(store: str, model: str | None, *, ann: str, **load: str):  # type: ignore[no-untyped-def]
    """The shared library at ``store``; ``--ann off`` ranks every row exactly there too."""
    from clipworks.library.ann import check_ann_options
    from clipworks.library.postgres import PostgresLibrary

    check_ann_options(ann, "f16")  # type: ignore[arg-type]
    return PostgresLibrary(store, model, exact=ann == "off", **load)


def similar(
    path: Annotated[Path, typer.Argument(help="A photo (in the library or not).")],
    top_k: TopKOpt = 10,
    threshold: ThresholdOpt = None,
    as_json: JsonOpt = False,
    results: ResultsOpt = None,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
    ann: AnnOpt = "auto",
    ann_dtype: AnnDtypeOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    camera: CameraOpt = None,
    folder: FolderOpt = None,
    near: NearOpt = None,
    kind: TypeOpt = None,
    tag: TagOpt = None,
    sort: SortOpt = "score",
    offset: OffsetOpt = 0,
    store: StoreOpt = None,
) -> None:
    """List the photos most like one photo: near-duplicates first, then visually similar ones."""
    filters = filters_of(after, before, camera, folder, near, kind, tag)
    library = (
        open_shared_library(store, model, ann=ann)
        if store is not None
        else open_library(db, model, ann=ann, ann_dtype=ann_dtype)
    )
    hits = library.similar(
        path,
        top_k=top_k,
        threshold=threshold,
        filters=filters,
        offset=offset,
        sort=sort,  # type: ignore[arg-type]
    )
    render(hits, as_json, results)


def duplicates(
    threshold: Annotated[float, typer.Option("--threshold", help="Cosine at or above which photos group.")] = 0.95,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
    store: StoreOpt = None,
) -> None:
    """Groups of near-duplicate photos over the whole library, largest group first."""
    library = open_shared_library(store, model, ann="auto") if store is not None else open_library(db, model)
    groups = library.duplicates(threshold)
    if as_json:
        print(json.dumps([[{"path": h.path, "score": round(h.score, 6)} for h in g] for g in groups], indent=2))
        return
    for number, group in enumerate(groups, 1):
        print(f"group {number} ({len(group)} photos)")
        for hit in group:
            print(f"  {hit.score:.4f}  {quote_path(hit.path)}")
    info(f"{len(groups)} groups of near-duplicates at cosine >= {threshold}")
