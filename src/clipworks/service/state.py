"""What the routes share: settings, the one model, the batcher, the tag vocabulary and label embeddings."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from clipworks import settings as env
from clipworks.errors import ClipworksError, ModelNotFound
from clipworks.labelbank import LabelBank, Scoring
from clipworks.service.batcher import Batcher
from clipworks.service.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PIXELS, decode_base64, decode_pixels
from clipworks.zeroshot import DEFAULT_TEMPLATE, TAG_TEMPLATE, TagIndex, vocabulary

if TYPE_CHECKING:
    from clipworks.service.immich import ImmichModels, ImmichSettings

log = logging.getLogger("clipworks.service")


@dataclass
class ServiceSettings:
    """Everything ``clipworks serve`` can set; the defaults suit one edge box."""

    model: str = field(default_factory=env.default_model)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    preprocess: str = "exact"
    # The photo library the gallery routes serve (mounted by the library feature when given).
    db: Path | None = None
    api_key: str | None = None
    # Host names the server answers to besides IP literals, localhost and this machine's name (webguard.py).
    allowed_hosts: tuple[str, ...] = ()
    # Hosts an Automatic1111 request may name as its image (``"image": "https://..."``); none by default.
    image_url_hosts: tuple[str, ...] = ()
    preload: bool = False
    # Dynamic batching: a batch closes at max_batch items or max_wait_ms after its first job.
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    retry_after: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_items: int = 256  # texts + images in one request
    # Interrogation: tags (None: the shipped imagenet1k vocabulary), template, threshold, caption length.
    tags: list[str] | None = None
    tag_template: str = TAG_TEMPLATE
    threshold: float = 0.22
    top: int = 10
    label_template: str = DEFAULT_TEMPLATE
    tags_cache_dir: Path | None = None
    label_cache_size: int = 256
    # Immich's machine-learning API (``clipworks.service.immich``): None leaves its routes out.
    immich: ImmichSettings | None = None


class ModelUnavailable(ClipworksError):
    """The served model could not be loaded: requests get 503 with this reason, ``/healthz`` says not ready."""


class ModelHolder:
    """The process's one model: given, or loaded once on first use (or at start-up with preload).

    A failed load is remembered (``error``) for ``/healthz`` and raised as ``ModelUnavailable``; the next use
    tries again, so a model fixed on disk serves without a restart.
    """

    def __init__(self, settings: ServiceSettings, model: Any = None) -> None:
        self.settings = settings
        self._model = model
        self._lock = threading.Lock()
        self.error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def name(self) -> str:
        return str(self._model.name) if self._model is not None else self.settings.model

    def check(self) -> None:
        """Find the model and check its files without opening or downloading it (cheap): a wrong name or path,
        or an incomplete bundle folder, fails now rather than in the first request."""
        if self._model is not None:
            return
        from clipworks.models.store import can_fetch

        try:
            self._resolve(download=False)
        except ModelNotFound:
            if not can_fetch(self.settings.model):
                raise
            if env.offline():
                raise
            log.info("model %s is not downloaded yet: the first request pulls it", self.settings.model)

    def _resolve(self, download: bool = True) -> Any:
        from clipworks.runtime.encoder import load

        s = self.settings
        return load(s.model, s.device, s.precision, threads=s.threads, preprocess=s.preprocess, download=download)  # type: ignore[arg-type]

    def get(self, reason: str = "first request", *, log_failure: bool = True) -> Any:
        """The model, loaded now if need be; ``log_failure``: also log a failed load (a request's 503 reaches
        only its client; a preload's caller reports the error itself)."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                log.info("loading model %s (%s)", self.settings.model, reason)
                t0 = time.perf_counter()
                try:
                    model = self._resolve()
                    provider = model.providers[0]  # opens the image session now, not in the first request
                except Exception as e:
                    self.error = f"model {self.settings.model} could not be loaded: {e}"
                    if log_failure:
                        log.error("%s", self.error)
                    raise ModelUnavailable(self.error) from e
                log.info(
                    "model %s loaded in %.1f s: %s on %s, %d-d",
                    model.name,
                    time.perf_counter() - t0,
                    model.precision,
                    provider,
                    model.embed_dim,
                )
                self._model, self.error = model, None
        return self._model


class ServiceState:
    def __init__(self, settings: ServiceSettings, model: Any = None, library: Any = None) -> None:
        self.settings = settings
        self.holder = ModelHolder(settings, model)
        self.library = library
        self.metrics: Any = None  # set by create_app
        self.batcher = Batcher(
            self.holder.get,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            retry_after=settings.retry_after,
            on_batch=self._on_batch,
        )
        # One build of the vocabulary however many requests wait for it (a future, not an asyncio lock:
        # test clients may run each request on a new event loop).
        self._tags: Future[TagIndex] | None = None
        self._tags_lock = threading.Lock()
        self._banks: OrderedDict[tuple[str, ...], LabelBank] = OrderedDict()
        self.immich: ImmichModels | None = None  # set by create_app when settings.immich is given

    def new_batcher(self, model: Any) -> Batcher:
        """A batcher for another model, with this service's batching limits and metrics (Immich's models)."""
        s = self.settings
        return Batcher(lambda: model, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                       retry_after=s.retry_after, on_batch=self._on_batch)  # fmt: skip

    def _on_batch(self, kind: str, size: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(kind, size, seconds)

    @property
    def model(self) -> Any:
        return self.holder.get()

    # -- images ------------------------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> model pixels, with the pixel limit (runs in a request thread)."""
        model = self.model
        return decode_pixels(data, model.preprocess_cfg, self.settings.max_pixels, model.preprocess_mode)

    def decode_b64(self, encoding: str) -> np.ndarray:
        return self.decode(decode_base64(encoding))

    async def decode_many(self, blobs: Sequence[bytes]) -> list[np.ndarray]:
        return await run_in_threadpool(lambda: [self.decode(b) for b in blobs])

    async def embed_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        return await self.batcher.embed("image", pixels)

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return await self.batcher.embed("text", texts)

    async def label_bank(self, labels: Sequence[str], template: str) -> LabelBank:
        """The bank of a client's labels in ``template``, encoded on the worker and kept in a small LRU.

        Clients send the same labels again and again; the LRU is in memory, not the bank's disk cache,
        because every label set a client makes up would otherwise leave a file behind.
        """
        key = (template, *labels)
        hit = self._banks.get(key)
        if hit is not None:
            self._banks.move_to_end(key)
            return hit
        rows = await self.embed_texts(LabelBank.prompts(labels, [template]))
        bank = LabelBank.from_encoded(labels, rows, Scoring.of(self.model), [template])
        self._banks[key] = bank
        while len(self._banks) > self.settings.label_cache_size:
            self._banks.popitem(last=False)
        return bank

    # -- tags --------------------------------------------------------------------------------------
    async def tag_index(self) -> TagIndex:
        """The interrogation vocabulary, encoded once on the worker (and cached on disk across runs)."""
        with self._tags_lock:
            if self._tags is None or (self._tags.done() and self._tags.exception() is not None):
                self._tags = self.batcher.submit_call(self._build_tags)
            future = self._tags
        return await asyncio.wrap_future(future)

    def _build_tags(self, model: Any) -> TagIndex:
        s = self.settings
        tags = s.tags if s.tags is not None else vocabulary("imagenet1k")
        t0 = time.perf_counter()
        index = TagIndex.build(model, tags, template=s.tag_template, cache_dir=s.tags_cache_dir)
        how = "read from cache" if index.bank.from_cache else "encoded"
        log.info("%d interrogation tags %s in %.1f s", len(index.tags), how, time.perf_counter() - t0)
        return index

    @property
    def preloaded(self) -> bool:
        return self.holder.loaded and self._tags is not None and self._tags.done() and not self._tags.exception()

    def preload(self) -> None:
        """Load the model and build the tag vocabulary now (``--preload``) instead of on first use.

        Runs on the calling thread, before requests arrive, so a failure reaches the caller as it is."""
        model = self.holder.get("--preload", log_failure=False)
        tags: Future[TagIndex] = Future()
        tags.set_result(self._build_tags(model))
        with self._tags_lock:
            self._tags = tags
