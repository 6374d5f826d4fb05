"""The HTTP app: Automatic1111's interrogate API and an encoder service, from one model in one process.

``create_app`` builds it; ``clipworks serve`` runs it with uvicorn. Requests never touch the model
themselves: they decode their images in request threads and hand pixels or texts to the single
inference worker (``batcher.py``), which batches what arrives together.

Other features add routes through ``routers`` (the photo library's search and gallery when the server is
given ``--db``); their handlers reach the shared state as ``request.app.state.clip`` (``ServiceState``:
``embed_texts``, ``embed_images``, ``decode``, ``settings.db``) and the library object passed as
``library`` as ``request.app.state.clip.library``.

With ``settings.immich`` the app also answers Immich's machine-learning API (``immich.py``: ``/ping``,
``/predict``, and ``/`` unless a library's gallery owns it) from models Immich names per request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipworks import __version__
from clipworks.errors import BadBundle
from clipworks.service import a1111, embeddings, health, immich
from clipworks.service.batcher import QueueFull
from clipworks.service.state import ModelUnavailable, ServiceSettings, ServiceState
from clipworks.webguard import GuardPolicy, WebGuard

log = logging.getLogger("clipworks.service")

OPEN_PATHS = frozenset({"/healthz"})


def create_app(
    settings: ServiceSettings | None = None,
    *,
    model: Any = None,
    library: Any = None,
    routers: Iterable[APIRouter] = (),
) -> FastAPI:
    """Build the service.

    ``model``: an already loaded ``ClipModel`` (or anything with its encode methods) to serve instead of
    loading ``settings.model``. ``library``: an opened photo library for the routes in ``routers``.
    """
    settings = settings or ServiceSettings()
    state = ServiceState(settings, model=model, library=library)
    served_routers = [health.router, a1111.router, embeddings.router, *routers]
    if settings.immich is not None:
        state.immich = immich_models(state)
        # First, so that Immich's "/" wins over the gallery's page when no library is served.
        served_routers = [immich.router, *([immich.root_router] if library is None else []), *served_routers]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        if settings.preload and not state.preloaded:  # `clipworks serve --preload` did it before listening
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(state.preload)
        elif not state.holder.loaded:
            log.info("model %s will load on the first request (start with --preload to load it now)", settings.model)
        if state.immich is not None:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(state.immich.preload)  # a no-op for names `clipworks serve` preloaded
            state.immich.start()
        try:
            yield
        finally:
            state.batcher.stop()
            if state.immich is not None:
                state.immich.stop()

    app = FastAPI(
        title="clipworks",
        version=__version__,
        description="CLIP on ONNX Runtime: Automatic1111-compatible interrogation, zero-shot tagging and "
        "text/image embeddings. With an API key, send `Authorization: Bearer KEY` (all routes but /healthz); "
        "a browser logs in at /login.",
        lifespan=lifespan,
    )
    app.state.clip = state
    state.metrics = health.Metrics(state)

    for router in served_routers:
        app.include_router(router)

    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFull, _queue_full)  # type: ignore[arg-type]
    for unavailable in (ModelUnavailable, BadBundle):  # a model that fails to load, or a tower that fails to open
        app.add_exception_handler(unavailable, _model_unavailable)  # type: ignore[arg-type]

    # Added last = outermost: metrics see every answer, the guard runs before any body is read.
    policy = GuardPolicy(
        api_key=settings.api_key,
        allowed_hosts=settings.allowed_hosts,
        max_body_bytes=settings.max_body_bytes,
        open_paths=OPEN_PATHS,
        error_body=_error_body,
    )
    app.add_middleware(WebGuard, policy=policy)
    app.add_middleware(health.MetricsMiddleware, metrics=state.metrics)
    return app


def immich_models(state: ServiceState) -> immich.ImmichModels:
    """The model cache of the Immich routes: Immich's models loaded with the "immich" profile on the service's
    device, precision and threads, each batched like the service's own model."""
    from clipworks.runtime.encoder import load

    s = state.settings

    def open_model(source: str) -> Any:
        try:
            model = load(source, s.device, s.precision, threads=s.threads, profile="immich")
            model.load_towers("visual")  # now, not in the first request
        except Exception as e:
            raise ModelUnavailable(f"Immich model {source} could not be loaded: {e}") from e
        return model

    return immich.ImmichModels(s.immich, open_model, state.new_batcher)


def _error_body(path: str, status: int, detail: Any) -> dict[str, Any]:
    """Automatic1111's error body on its routes (``api_middleware.handle_exception``), FastAPI's elsewhere.

    Its ``errors`` is ``str(e)``: empty for the HTTPException of the starlette its pinned fastapi 0.94 brings
    (that class sets no exception args and defines no ``__str__``)."""
    if path.startswith("/sdapi/"):
        return {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}
    return {"detail": detail}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        _error_body(request.url.path, exc.status_code, exc.detail), status_code=exc.status_code, headers=exc.headers
    )


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return JSONResponse(
        _error_body(request.url.path, 503, str(exc)), status_code=503, headers={"Retry-After": str(exc.retry_after)}
    )


async def _model_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_error_body(request.url.path, 503, str(exc)), status_code=503)
