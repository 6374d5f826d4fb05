"""Immich's machine-learning API (``clipworks serve --immich``): ``/``, ``/ping`` and ``POST /predict``.

The contract is the one Immich's server speaks (``server/src/repositories/machine-learning.repository.ts``) to its
own service (``machine-learning/immich_ml/main.py``): a multipart body with an ``entries`` field, JSON such as
``{"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}`` or ``{"clip": {"textual": {"modelName": "...",
"options": {"language": "de-DE"}}}}``, and an ``image`` file or a ``text`` field. The answer is
``{"clip": "[0.0123,...]"}`` (the embedding as a JSON array *inside a string*, orjson's float32 spelling, which
Immich's server hands to Postgres as it is), plus ``imageHeight`` and ``imageWidth`` for an image.

Vectors are Immich's own: every model is loaded with the "immich" preprocessing profile
(``clipworks.profiles``), the bundle's graphs are Immich's (they normalise inside), and nothing is normalised
again. Errors keep Immich's status codes and messages where Immich answers deliberately (422 "Invalid request
format.", 400 "Either image or text must be provided"); where Immich fails with a 500 (an unknown model, an
unreadable image) clipworks answers a 4xx that names the problem, and a task it does not do (facial
recognition, OCR) is a 422 naming the task.

Immich names a model in every request, so several may be loaded at once: :class:`ImmichModels` keeps each
with its own batcher and unloads it after ``model_ttl`` idle seconds (``MACHINE_LEARNING_MODEL_TTL``, as
Immich), except the preloaded ones (``MACHINE_LEARNING_PRELOAD__CLIP__VISUAL`` / ``__TEXTUAL``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from clipworks.errors import ClipworksError
from clipworks.models.bundle import is_bundle_dir
from clipworks.models.immich_names import OPENCLIP_BUNDLES
from clipworks.models.registry import list_models
from clipworks.profiles import immich_query
from clipworks.service.batcher import Batcher
from clipworks.service.limits import ImageTooLarge, InvalidImage, check_pixels, decode_pixels

log = logging.getLogger("clipworks.service")

INVALID_REQUEST = "Invalid request format."
NO_INPUT = "Either image or text must be provided"
SEARCH_TASK = "clip"
# Immich's other tasks (its ModelTask); named in the refusal so that Immich's log says what is missing.
OTHER_TASKS = {"facial-recognition": "Facial Recognition", "ocr": "OCR"}
TYPES = ("visual", "textual")


@dataclass
class ImmichSettings:
    """How the Immich routes hold models; ``clipworks serve`` fills it from Immich's ``MACHINE_LEARNING_*``."""

    # Seconds a model may sit idle before it is unloaded; 0 keeps every model (Immich's default is 300).
    model_ttl: float = 300.0
    # How often idle models are looked for (Immich's MACHINE_LEARNING_MODEL_TTL_POLL_S).
    ttl_poll_s: float = 10.0
    # Loaded at start and never unloaded (Immich's MACHINE_LEARNING_PRELOAD__CLIP__VISUAL / __TEXTUAL).
    preload: tuple[str, ...] = ()
    # Immich's model cache (MACHINE_LEARNING_CACHE_FOLDER): bundles found as <folder>/clip/<name> are used as
    # they are, so a folder Immich downloaded serves without a second download.
    cache_folder: Path | None = None


class UnknownImmichModel(ClipworksError):
    """A model name clipworks cannot serve: answered 422 with this message."""


def clean_name(name: str) -> str:
    """Immich's ``clean_name``: the part after the last ``/``, with ``:`` and ``\\`` as ``_`` and dots dropped."""
    return name.split("/")[-1].translate(str.maketrans(":\\/", "___", "."))


# Immich's spelling of each registry record it publishes a bundle of: "ViT-B-32__laion2b-s34b-b79k" ->
# ViT-B-32::laion2b_s34b_b79k. Records added to the registry (SigLIP 2, NLLB) are served as they land.
# Immich's multilingual models that are not open_clip weight sets (immich_ml/models/constants.py, MCLIP_MODELS).
MCLIP_BUNDLES = frozenset(
    {"LABSE-Vit-L-14", "XLM-Roberta-Large-Vit-B-32", "XLM-Roberta-Large-Vit-L-14", "XLM-Roberta-Large-Vit-B-16Plus"}
)


def _registry_names() -> dict[str, str]:
    return {r.hf_repo.split("/", 1)[1]: r.name for r in list_models() if r.hf_repo}


def model_source(name: str, cache_folder: Path | None = None) -> str:
    """What ``clipworks.load`` should open for Immich's model ``name``: a bundle in Immich's cache folder, else
    the registry name of the same weights (pulled from the same ``immich-app/`` repository as Immich pulls)."""
    cleaned = clean_name(name)
    if cache_folder is not None:
        for candidate in (cache_folder / SEARCH_TASK / cleaned, cache_folder / cleaned):
            if is_bundle_dir(candidate):
                return str(candidate)
    registry = _registry_names()
    if cleaned in registry:
        return registry[cleaned]
    where = f" or put its bundle in {cache_folder / SEARCH_TASK / cleaned}" if cache_folder else ""
    if cleaned in OPENCLIP_BUNDLES:
        raise UnknownImmichModel(
            f"Immich's CLIP model '{cleaned}' is not in clipworks' registry yet: choose another model in Immich's "
            f"Smart Search settings{where}"
        )
    if cleaned in MCLIP_BUNDLES:
        raise UnknownImmichModel(
            f"Immich's M-CLIP model '{cleaned}' is not served by clipworks (its text tower is not an open_clip "
            f"model): choose another model in Immich's Smart Search settings{where}"
        )
    raise UnknownImmichModel(f"Unknown CLIP model '{name}': Immich's names look like ViT-B-32__openai{where}")


@dataclass
class Entry:
    """One model request of ``entries``: task ("clip"), type ("visual" or "textual"), model name, options."""

    task: str
    type: str
    name: str
    options: dict[str, Any]


def parse_entries(raw: str) -> list[Entry]:
    """``entries`` as Immich's ``get_entries`` reads it; anything malformed is its 422 "Invalid request format."
    (Immich answers 500 for an entry or options of the wrong JSON type; clipworks 422 as well.)"""
    try:
        request = orjson.loads(raw)
        entries = [
            Entry(task, kind, entry["modelName"], entry.get("options", {}))
            for task, types in request.items()
            for kind, entry in types.items()
        ]
    except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError):
        raise HTTPException(422, INVALID_REQUEST) from None
    if any(not isinstance(e.name, str) or not isinstance(e.options, dict) for e in entries):
        raise HTTPException(422, INVALID_REQUEST)
    for entry in entries:
        if entry.task in OTHER_TASKS:
            raise HTTPException(
                422,
                f"clipworks does not serve Immich's {entry.task} task ({OTHER_TASKS[entry.task]}), only clip "
                "(Smart Search): turn it off in Immich's Machine Learning settings or send it to Immich's service",
            )
        if entry.task != SEARCH_TASK or entry.type not in TYPES:
            raise HTTPException(422, f"Unknown model combination: {entry.task} {entry.type} (clipworks serves clip "
                                     "visual and clip textual)")  # fmt: skip
    return entries


@dataclass
class _Held:
    """One loaded model, its batcher, and what decides when it may go."""

    name: str
    model: Any
    batcher: Batcher
    pinned: bool = False
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ImmichModels:
    """The models Immich asks for by name, each loaded once (with the "immich" profile) and unloaded when idle.

    ``load(source)`` opens a model (the service's ``clipworks.load`` with its device and precision);
    ``batcher(model)`` makes the batcher that serialises and batches its runs.
    """

    def __init__(
        self,
        settings: ImmichSettings,
        load: Callable[[str], Any],
        batcher: Callable[[Any], Batcher],
    ) -> None:
        self.settings = settings
        self._load = load
        self._make_batcher = batcher
        self._held: dict[str, _Held] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def acquire(self, name: str, pinned: bool = False) -> _Held:
        """The model ``name``, loaded now if need be (blocking), and kept loaded until ``release``."""
        key = clean_name(name)
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                held.in_use += 1
                held.pinned = held.pinned or pinned
                return held
        source = model_source(name, self.settings.cache_folder)  # unknown names stop here, holding nothing
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model however many requests wait for it
            with self._lock:
                held = self._held.get(key)
            if held is None:
                t0 = time.perf_counter()
                model = self._load(source)
                log.info("Immich model %s loaded from %s in %.1f s", key, source, time.perf_counter() - t0)
                held = _Held(key, model, self._make_batcher(model), pinned=pinned)
            with self._lock:
                self._held.setdefault(key, held)
                held = self._held[key]
                held.in_use += 1
                held.pinned = held.pinned or pinned
        return held

    def release(self, held: _Held) -> None:
        with self._lock:
            held.in_use -= 1
            held.last_used = time.monotonic()

    def preload(self) -> None:
        """Load the preload names now; they stay loaded whatever the TTL (as Immich keeps preloaded models)."""
        for name in self.settings.preload:
            with self._lock:
                if clean_name(name) in self._held:
                    continue
            self.release(self.acquire(name, pinned=True))

    def sweep(self, now: float | None = None) -> list[str]:
        """Unload models idle for longer than ``model_ttl`` (none when it is 0); the names unloaded."""
        ttl = self.settings.model_ttl
        if ttl <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                h for h in self._held.values()
                if not h.pinned and h.in_use == 0 and h.batcher.depth == 0 and now - h.last_used > ttl
            ]  # fmt: skip
            for held in idle:
                del self._held[held.name]
        for held in idle:
            held.batcher.stop()
            log.info("Immich model %s unloaded after %.0f s idle", held.name, now - held.last_used)
        return [h.name for h in idle]

    def start(self) -> None:
        if self.settings.model_ttl <= 0 or (self._sweeper is not None and self._sweeper.is_alive()):
            return
        self._stop.clear()
        poll = max(min(self.settings.ttl_poll_s, self.settings.model_ttl), 0.05)

        def run() -> None:
            while not self._stop.wait(poll):
                self.sweep()

        self._sweeper = threading.Thread(target=run, name="clipworks-immich-ttl", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(5)
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.batcher.stop()


# -- routes -------------------------------------------------------------------------------------------

router = APIRouter(tags=["immich"])
# Immich's "/" answers {"message": "Immich ML"}; mounted only where the photo gallery does not own "/".
root_router = APIRouter(tags=["immich"])


@root_router.get("/", summary="Immich ML: who is answering")
async def root() -> Response:
    return Response(orjson.dumps({"message": "Immich ML"}), media_type="application/json")


@router.get("/ping", response_class=PlainTextResponse, summary="Immich ML: health check")
def ping() -> str:
    return "pong"


def serialize(vector: np.ndarray) -> str:
    """Immich's ``serialize_np_array``: a float32 vector as orjson's JSON array text."""
    return orjson.dumps(np.ascontiguousarray(vector, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY).decode()


_ENTRIES_EXAMPLE = '{"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}'
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["entries"],
                    "properties": {
                        "entries": {"type": "string", "example": _ENTRIES_EXAMPLE},
                        "image": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                    },
                }
            }
        },
    }
}  # fmt: skip


@router.post("/predict", openapi_extra=_PREDICT_BODY, summary="Immich ML: CLIP image or text embedding")
async def predict(request: Request) -> Response:
    state = request.app.state.clip
    settings = state.settings
    form = await request.form(max_part_size=settings.max_body_bytes)
    raw = form.get("entries")
    if not isinstance(raw, str):  # FastAPI's own answer to Immich's service for a missing Form() field
        raise RequestValidationError([{"type": "missing", "loc": ("body", "entries"), "msg": "Field required",
                                       "input": None}])  # fmt: skip
    entries = parse_entries(raw)
    image, text = form.get("image"), form.get("text")
    payload: bytes | str
    response: dict[str, Any] = {}
    if image is not None:
        payload = await image.read() if isinstance(image, UploadFile) else image.encode()
        try:
            width, height = await run_in_threadpool(check_pixels, payload, settings.max_pixels)
        except ImageTooLarge as e:
            raise HTTPException(413, f"image: {e}") from e
        except InvalidImage as e:
            raise HTTPException(400, f"image: {e}") from e
    elif isinstance(text, str):
        payload = text
    else:
        raise HTTPException(400, NO_INPUT)
    models: ImmichModels = state.immich
    outputs = await asyncio.gather(*(_embed(models, entry, payload, settings.max_pixels) for entry in entries))
    for entry, output in zip(entries, outputs, strict=True):
        response[entry.task] = output  # as Immich: one answer per task, the last entry's
    if isinstance(payload, bytes):
        response["imageHeight"], response["imageWidth"] = height, width
    return Response(orjson.dumps(response), media_type="application/json")


async def _embed(models: ImmichModels, entry: Entry, payload: bytes | str, max_pixels: int) -> str:
    if (entry.type == "visual") != isinstance(payload, bytes):
        wanted = "an image" if entry.type == "visual" else "a text"
        raise HTTPException(400, f"clip {entry.type} needs {wanted}")
    try:
        held = await run_in_threadpool(models.acquire, entry.name)
    except UnknownImmichModel as e:
        raise HTTPException(422, str(e)) from e
    try:
        if isinstance(payload, bytes):
            try:
                pixels = await run_in_threadpool(decode_pixels, payload, held.model.preprocess_cfg, max_pixels)
            except InvalidImage as e:
                raise HTTPException(400, f"image: {e}") from e
            emb = await held.batcher.embed("image", [pixels])
        else:
            language = entry.options.get("language")
            query = immich_query(payload, language if isinstance(language, str) else None, held.name.startswith("nllb"))
            emb = await held.batcher.embed("text", [query])
    finally:
        models.release(held)
    return serialize(emb[0])
