"""``clipworks serve``: the HTTP service (Automatic1111 interrogate, embeddings, classify, rank)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli import access
from clipworks.cli.common import DeviceOpt, PrecisionOpt, ThreadsOpt, info
from clipworks.cli.index import StoreOpt
from clipworks.errors import ClipworksError, UsageError

ServeModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="CLIPWORKS_MODEL",
        help="Registry name or bundle path (default: with --db or --store the library's model, else ViT-B-32::openai).",
    ),
]


def serve(
    model: ServeModelOpt = None,
    db: Annotated[
        Path | None,
        typer.Option(help="Photo library to serve: the gallery at / and the search API at /api/search."),
    ] = None,
    store: StoreOpt = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default 127.0.0.1; 0.0.0.0 with --api-key).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port (Automatic1111 clients usually use 7860).")] = 8000,
    api_key: access.ApiKeyOpt = None,
    api_key_file: access.ApiKeyFileOpt = None,
    allowed_host: access.AllowedHostOpt = None,
    image_url_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Host an Automatic1111 request may name as its image (an http(s) URL; repeatable, '*' for any). "
            "Default: none, as fetching what a request names lets it reach the hosts around the server."
        ),
    ] = None,
    preload: Annotated[
        bool,
        typer.Option(
            help="Load the model and tag vocabulary before listening (else on the first request; "
            "/healthz answers 503 until then)."
        ),
    ] = False,
    tags_file: Annotated[Path | None, typer.Option(help="Interrogation vocabulary (default imagenet1k).")] = None,
    threshold: Annotated[float, typer.Option(help="Interrogation cosine threshold.")] = 0.22,
    top: Annotated[int, typer.Option(min=1, help="Most tags in a caption.")] = 10,
    max_batch: Annotated[int, typer.Option(min=1, help="Most items per model run.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits for more requests.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Items waiting beyond which requests get 503.")] = 256,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body.")] = 32.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image (width x height); larger ones get 413.")] = 40_000_000,
    immich: Annotated[
        bool,
        typer.Option(
            "--immich",
            help="Also answer Immich's machine-learning API (/ping, /predict; / without --db): set Immich's "
            "Machine Learning URL to this server. CLIP only (Smart Search); see the README.",
        ),
    ] = False,
    immich_model_ttl: Annotated[
        float,
        typer.Option(
            envvar="MACHINE_LEARNING_MODEL_TTL", min=0, help="Seconds before an idle Immich model is unloaded; 0 never."
        ),
    ] = 300.0,
    immich_preload: Annotated[
        list[str] | None,
        typer.Option(
            help="Immich model to load at start and keep (repeatable; default: the comma-separated names in "
            "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL and __TEXTUAL)."
        ),
    ] = None,
    immich_cache_folder: Annotated[
        Path | None,
        typer.Option(
            envvar="MACHINE_LEARNING_CACHE_FOLDER",
            help="Immich's model cache: bundles in its clip/<name> folders are served as they are.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve Automatic1111's /sdapi/v1/interrogate and an embedding API from one model (docs at /docs)."""
    try:
        import uvicorn

        from clipworks.service import ServiceSettings, create_app
    except ImportError as e:
        raise ClipworksError(
            f"the HTTP service needs its extra ({e.name} is missing): pip install 'clipworks[serve]'"
        ) from e
    from clipworks import settings as env
    from clipworks.zeroshot import load_labels_file

    key = access.api_key(api_key, api_key_file)
    bind = host or ("0.0.0.0" if key else "127.0.0.1")
    if host and host not in ("127.0.0.1", "localhost", "::1") and not key:
        info(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UsageError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    logger = logging.getLogger("clipworks")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    if db is not None and store is not None:
        raise UsageError("give --db (a library file) or --store (a shared library; CLIPWORKS_STORE sets it), not both")
    served = db is not None or store is not None
    clip, library = open_served_library(db, store, model, device, precision, threads) if served else (None, None)
    name = clip.name if clip is not None else model or env.default_model()
    svc = ServiceSettings(
        model=name,
        device=device,
        precision=precision,
        threads=threads,
        db=db,
        api_key=key,
        allowed_hosts=access.allowed_hosts(bind, allowed_host),
        image_url_hosts=tuple(image_url_host or ()),
        preload=preload,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_body_bytes=int(max_body_mb * 2**20),
        max_pixels=max_pixels,
        tags=load_labels_file(tags_file) if tags_file else None,
        threshold=threshold,
        top=top,
        immich=immich_settings(immich_model_ttl, immich_preload, immich_cache_folder) if immich else None,
    )
    from clipworks.service import gallery

    app = create_app(svc, model=clip, library=library, routers=[gallery.router])
    # A model that cannot serve stops the command here, in one line, before anything says "serving".
    where = f"http://{bind}:{port}"
    if preload:
        app.state.clip.preload()
    elif not (immich and model is None):  # an Immich server may never use the /v1 routes' default model
        app.state.clip.holder.check()
    if app.state.clip.immich is not None:
        app.state.clip.immich.preload()
        info(f"Immich's machine-learning API at {where}/predict (Immich: Machine Learning URL {where})")
    if library is not None:
        info(f"gallery of {library.where} at {where}/")
    info(f"clipworks serving {name} on {where} (docs at /docs){'' if key else ', no API key'}")
    uvicorn.run(app, host=bind, port=port, log_level=log_level.lower())


def open_served_library(db: Path | None, store: str | None, model: str | None, device: str, precision: str,
                        threads: int | None):  # type: ignore[no-untyped-def]  # fmt: skip
    """The library at ``db`` (SQLite) or ``store`` (Postgres) and the model to serve it with, loaded now: the
    library's own model unless ``--model`` names another one it also holds vectors for (queries must be
    encoded by the indexing model)."""
    from clipworks.cli.common import load_model
    from clipworks.library import Library

    def open_library(clip: object = None):  # type: ignore[no-untyped-def]
        if store is not None:
            from clipworks.library.postgres import PostgresLibrary

            return PostgresLibrary(store, clip)
        return Library(db, clip)

    source = model
    if source is None:
        with open_library() as probe:
            source, where = probe.model_row.source, probe.where
        if source is None:
            raise UsageError(f"{where} does not record where its model came from; pass --model")
    clip = load_model(source, device, precision, threads)
    library = open_library(clip)
    library.model_row  # noqa: B018 -- refuse a model the library has no vectors for now, not on the first query
    return clip, library


def immich_settings(model_ttl: float, preload: list[str] | None, cache_folder: Path | None):  # type: ignore[no-untyped-def]
    """The Immich routes' settings; preloads default to Immich's own environment variables."""
    import os

    from clipworks.service.immich import ImmichSettings

    if preload is None:
        names = ",".join(os.environ.get(f"MACHINE_LEARNING_PRELOAD__CLIP__{t}", "") for t in ("VISUAL", "TEXTUAL"))
        preload = [n.strip() for n in names.split(",") if n.strip()]
    if cache_folder is not None and not cache_folder.is_dir():
        raise UsageError(f"--immich-cache-folder {cache_folder} is not a folder; pass Immich's model cache folder")
    return ImmichSettings(model_ttl=model_ttl, preload=tuple(dict.fromkeys(preload)), cache_folder=cache_folder)
