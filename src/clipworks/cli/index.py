"""``clipworks index add|status|remove|export|import``: the photo library database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import DeviceOpt, PrecisionOpt, ThreadsOpt, check_preprocess, info

app = typer.Typer(help="Index folders of photos and videos into a searchable SQLite library.", no_args_is_help=True)

DbOpt = Annotated[
    Path | None,
    typer.Option("--db", help="Library file (default: $CLIPWORKS_DB or ~/.local/share/clipworks/library.db)."),
]
LibraryModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        envvar="CLIPWORKS_MODEL",
        help="Registry name or bundle path (default: the model the library was indexed with, else ViT-B-32::openai).",
    ),
]
AnnOpt = Annotated[
    str,
    typer.Option(
        "--ann",
        help="Approximate search (HNSW, exact re-ranking): auto (from 100000 photos), on or off (always exact).",
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="CLIPWORKS_STORE",
        help="A shared library in Postgres with pgvector (postgres://USER@HOST/DB): `index add` and `index push` "
        "copy what changed in --db there; `search` ranks there. Needs clipworks[postgres].",
    ),
]
AnnDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--ann-dtype",
        help="The approximate index's memory budget: an HNSW graph of f16, i8 (half the memory) or f32 vectors, "
        "or pq: IVF-PQ's 64-byte codes (a tenth of f16; for millions of photos). "
        "Default: what the library's index has, else f16, or pq from 1,000,000 photos; another rebuilds it.",
    ),
]


def open_library(db: Path | None, model: str | None, *, create: bool = False, need_model: bool = False, **load):  # type: ignore[no-untyped-def]
    """A Library; ``need_model`` falls back to the default model when the library has none yet."""
    from clipworks.library import Library
    from clipworks.settings import default_model

    library = Library(db, model, create=create, **load)
    if model is None and need_model and not library.store.models():
        library = Library(db, default_model(), create=create, **load)
    return library


@app.command()
def add(
    folders: Annotated[list[Path], typer.Argument(help="Folders of photos and videos (searched recursively).")],
    db: DbOpt = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of paths or names to skip (repeatable; remembered per folder)."),
    ] = None,
    follow_links: Annotated[
        bool | None,
        typer.Option(
            "--follow-links/--no-follow-links",
            help="Follow symlinked folders that lead outside the folder (remembered per folder; default: no). "
            "Links to image files are always followed.",
        ),
    ] = None,
    model: LibraryModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call and per commit.")] = 32,
    workers: Annotated[int | None, typer.Option(help="Decoder threads (default: cores, at most 8).")] = None,
    preprocess: Annotated[
        str,
        typer.Option(
            help="fast (reduced JPEG decode, the fastest installed decoders; embeddings within cosine 0.999 of "
            "exact) or exact (open_clip's transform). `index status` says which made the vectors.",
        ),
    ] = "fast",
    threads: ThreadsOpt = None,
    ann: AnnOpt = "auto",
    ann_dtype: AnnDtypeOpt = None,
    video_every: Annotated[
        float | None,
        typer.Option(
            "--video-every",
            help="Seconds between the moments taken from each video, besides one at every shot change "
            "(default 2 for new videos; given, videos sampled at another interval are sampled again). "
            "Leave videos out with --exclude '*.mp4'.",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Add folders to the library, or bring them up to date: only new and changed files are embedded. A photo
    gets one vector; a video one per moment, a frame every --video-every seconds and one at each shot change."""
    check_preprocess(preprocess)
    library = open_library(db, model, create=True, need_model=True, device=device, precision=precision,
                           threads=threads, ann=ann, ann_dtype=ann_dtype)  # fmt: skip
    progress = {"embedded": 0}
    try:
        report = library.index(
            folders, excludes=exclude, follow_links=follow_links, batch_size=batch_size, workers=workers,
            decode=preprocess, on_batch=lambda n: progress.update(embedded=n), video_every=video_every,
        )  # fmt: skip
    except KeyboardInterrupt:
        info(f"interrupted: {progress['embedded']} files embedded and committed; run the same command to continue")
        raise
    for folder in report.skipped_folders:
        if folder.kind == "unreadable":
            info(f"warning: cannot read folder {folder.path} ({folder.detail}); its photos are kept as they were")
        else:
            info(f"warning: not following {folder.path} -> {folder.detail}: it leads outside the folder "
                 "(--follow-links indexes it)")  # fmt: skip
    info(f"{library.path}: {report.summary()}")
    if report.failures:
        info(f"{len(report.failures)} files could not be read; they are retried when they change (`index status`)")
    if store is not None:
        push_to_store(library, store)


def push_to_store(library, store: str) -> None:  # type: ignore[no-untyped-def]
    """Copy what changed in ``library`` (SQLite) into the shared store at ``store`` and say what was sent."""
    from clipworks.library.postgres import push_library, redacted

    report = push_library(library.store, store)
    info(f"{redacted(store)}: {report.summary()}")


@app.command()
def push(
    store: Annotated[
        str,
        typer.Option("--store", envvar="CLIPWORKS_STORE", help="The shared library: postgres://USER@HOST/DB."),
    ],
    db: DbOpt = None,
) -> None:
    """Copy the library's files, vectors and tags into a shared library in Postgres (pgvector): only what
    changed since the last push; several indexers may push into one store at once."""
    from clipworks.library import Library

    push_to_store(Library(db), store)


@app.command()
def status(
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    ann: AnnOpt = "auto",
    ann_dtype: AnnDtypeOpt = None,
    store: StoreOpt = None,
) -> None:
    """Folders, files, vectors per model, files waiting to be embedded, unreadable files, and which index
    answers queries; with --store, what the shared library holds."""
    from clipworks.display import quote_path
    from clipworks.library import Library

    if store is not None:
        store_status(store, as_json)
        return
    state = Library(db, ann=ann, ann_dtype=ann_dtype).status()
    if as_json:
        print(json.dumps({
            "db": str(state.path), "schema_version": state.schema_version,
            "folders": [{"path": p, "excludes": e, "files": n} for p, e, n in state.roots],
            "files": state.files, "deleted": state.deleted, "excluded": state.excluded,
            "models": [{"name": m.name, "dim": m.dim, "vectors": v, "pending": w, "precision": m.precision,
                        "decode": m.decode} for m, v, w in state.models],
            "errors": [{"path": p, "error": e} for p, e in state.errors],
            "search_index": state.search_index, "videos": state.videos, "moments": state.moments,
        }, indent=2))  # fmt: skip
        return
    print(f"library {quote_path(str(state.path))} (schema {state.schema_version})")
    for path, excludes, count in state.roots:
        skip = f" (excluding {', '.join(map(quote_path, excludes))})" if excludes else ""
        print(f"  folder {quote_path(path)}: {count} files{skip}")
    print(f"  {state.files} files, {state.deleted} deleted, {state.excluded} excluded, {len(state.errors)} unreadable")
    if state.videos:
        print(f"  {state.videos} videos, searched as {state.moments} moments")
    for row, vectors, waiting in state.models:
        more = f", {waiting} waiting" if waiting else ""
        print(f"  model {row.name} ({row.dim}-d): {vectors} vectors{more}; {row.produced_by()}")
    print(f"  search index: {state.search_index}")
    for path, error in state.errors:
        print(f"  unreadable {quote_path(path)}: {quote_path(error)}")


def store_status(url: str, as_json: bool) -> None:
    from clipworks.library.postgres import PostgresStore

    with PostgresStore(url) as store:
        state = store.status()
    if as_json:
        print(json.dumps({
            "store": state.url, "pgvector": state.pgvector, "files": state.files, "deleted": state.deleted,
            "models": [{"name": m.name, "dim": m.dim, "vectors": v, "hnsw": hnsw, "precision": m.precision,
                        "decode": m.decode} for m, v, hnsw in state.models],
        }, indent=2))  # fmt: skip
        return
    print(f"store {state.url} (pgvector {state.pgvector})")
    print(f"  {state.files} files, {state.deleted} deleted")
    for row, vectors, hnsw in state.models:
        index = "HNSW index" if hnsw else "no HNSW index (a push is building it, or one stopped): exact scans"
        print(f"  model {row.name} ({row.dim}-d): {vectors} vectors; {index}; {row.produced_by()}")


@app.command()
def remove(
    folder: Annotated[Path, typer.Argument(help="A folder added before.")],
    db: DbOpt = None,
) -> None:
    """Forget a folder: its files and their vectors leave the library (the photos stay on disk)."""
    from clipworks.library import Library

    removed = Library(db).remove(folder)
    info(f"removed {folder} and {removed} files from the library")


FormatOpt = Annotated[
    str | None, typer.Option("--format", help="pkl, npy, parquet or clipitems (default: from the suffix).")
]


@app.command("export")
def export_(
    output: Annotated[Path, typer.Argument(help="OUT.pkl (Sophgo), OUT.npy (+ .paths.json), OUT.parquet or OUT.db.")],
    fmt: FormatOpt = None,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
    store: StoreOpt = None,
) -> None:
    """Write the vectors of every present photo to an interchange file (from the shared library with
    --store). An existing ClipItems database (the robot's clip.db) keeps its rows and gets those of the photos
    it lacks, as the robot's storage mode adds them."""
    if store is not None:
        from clipworks.library.postgres import PostgresLibrary

        with PostgresLibrary(store, model) as shared:
            report = shared.export(output, fmt)
    else:
        report = open_library(db, model).export(output, fmt)
    if report.merged:
        info(f"{output}: added {report.count}, skipped {report.skipped} already present")
    else:
        info(f"exported {report.count} vectors to " + ", ".join(str(p) for p in report.written))


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="embeddings.pkl, .npy (+ .paths.json), .parquet or a ClipItems .db.")],
    fmt: FormatOpt = None,
    db: DbOpt = None,
    model: LibraryModelOpt = None,
) -> None:
    """Add vectors made elsewhere; their dimension must match the model's."""
    report = open_library(db, model, create=True, need_model=True).import_file(file, fmt)
    missing = f" ({report.missing} of the paths are not on this machine)" if report.missing else ""
    info(f"imported {report.imported} vectors from {file}{missing}")


def write_sidecar_files(items: list[tuple[str, list[str]]], fmt: str, overwrite: bool) -> None:
    """Write the sidecars and say what became of them; a refused one is named with the reason."""
    from clipworks.display import quote_path
    from clipworks.library.sidecars import write_sidecars

    report = write_sidecars(items, fmt, overwrite=overwrite)
    kept = f", kept {len(report.kept)} that exist (--overwrite replaces them)" if report.kept else ""
    info(f"wrote {len(report.written)} .{fmt} sidecars{kept}")
    for target, why in report.refused:
        info(f"warning: left {quote_path(str(target))} as it was: {why}")


@app.command()
def sidecars(
    fmt: Annotated[
        str, typer.Option("--format", help="xmp (photo.jpg.xmp keywords, merged) or txt (photo.txt).")
    ] = "xmp",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace .txt sidecars that exist.")] = False,
    db: DbOpt = None,
) -> None:
    """Write the tags stored by `interrogate --write-tags` next to every tagged photo, for photo tools
    (darktable, digiKam) or training sets to read."""
    from clipworks.library import Library
    from clipworks.library.sidecars import sidecar_format

    sidecar_format(fmt, "--format")
    tagged = Library(db).store.tagged_files()
    write_sidecar_files([(path, [tag for tag, _ in tags]) for path, tags in tagged], fmt, overwrite)
