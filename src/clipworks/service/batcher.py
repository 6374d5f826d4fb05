"""One inference worker with dynamic batching.

Every request that needs the model hands its decoded pixels or its texts to :class:`Batcher`; a single
worker thread takes the oldest job, gathers more until ``max_batch`` items or ``max_wait_ms`` have
passed, runs one image batch and one text batch, and hands each job back its own rows. Being the only
thread that runs the model, it also serialises access to the accelerator.

The queue is bounded in items: a job that would take it past ``max_queue`` is refused at once with
:class:`QueueFull` (the service answers 503 with ``Retry-After``), so a burst never piles up latency
without bound. A failing batch is retried job by job, so one bad job fails alone and the worker lives on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

log = logging.getLogger("clipworks.service")

Kind = Literal["image", "text", "call"]


class QueueFull(Exception):
    """The inference queue is at its limit; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"inference queue is full ({depth} of {limit} items waiting); retry later")
        self.retry_after = retry_after


@dataclass
class _Job:
    kind: Kind
    items: Sequence[Any]  # pixel arrays (3,S,S), texts, or () for a call
    future: Future[Any] = field(default_factory=Future)
    fn: Callable[[Any], Any] | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.items)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0


class Batcher:
    """Gathers concurrent embedding requests into batches for one model, on one worker thread.

    ``model`` is a callable returning the model (so that it can load on first use, in the worker).
    ``on_batch(kind, size, seconds)`` is called after each model run (metrics).
    """

    def __init__(
        self,
        model: Callable[[], Any],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        retry_after: int = 1,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: deque[_Job] = deque()
        self._pending = 0  # items waiting in the queue
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="clipworks-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting ----------------------------------------------------------------------------------
    def submit(self, kind: Kind, items: Sequence[Any]) -> Future[Any]:
        """Queue images (pixel arrays) or texts; the future gives their embeddings ``(len(items), D)``."""
        if kind not in ("image", "text") or not items:
            raise ValueError(f"submit needs a non-empty list of images or texts, not {kind!r} x {len(items)}")
        job = _Job(kind, list(items))
        with self._cond:
            # An empty queue takes any job, so one request larger than the queue limit can still run.
            if self._pending and self._pending + job.size > self.max_queue:
                raise QueueFull(self._pending, self.max_queue, self.retry_after)
            self._enqueue(job)
        return job.future

    def submit_call(self, fn: Callable[[Any], Any]) -> Future[Any]:
        """Run ``fn(model)`` on the worker (e.g. encoding a tag vocabulary); not counted against the limit."""
        job = _Job("call", (), fn=fn)
        with self._cond:
            self._enqueue(job)
        return job.future

    def _enqueue(self, job: _Job) -> None:
        if self._thread is None or not self._thread.is_alive():
            self.start()  # the condition's lock is re-entrant
        self._queue.append(job)
        self._pending += job.size
        self._cond.notify()

    async def embed(self, kind: Kind, items: Sequence[Any]) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(kind, items))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.wrap_future(self.submit_call(fn))

    # -- the worker ------------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """Block for the next batch: the oldest job plus whatever fits within max_batch and max_wait."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            self._pending -= first.size
            if first.kind == "call":
                return [first]
            batch, n = [first], first.size
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch:
                while self._queue and self._queue[0].kind != "call" and n + self._queue[0].size <= self.max_batch:
                    job = self._queue.popleft()
                    self._pending -= job.size
                    batch.append(job)
                    n += job.size
                remaining = deadline - time.perf_counter()
                if n >= self.max_batch or remaining <= 0 or self._queue or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            # Drop jobs whose caller went away (a cancelled future) before spending the model on them.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Job]) -> None:
        try:
            model = self._model()
        except BaseException as e:  # a model that fails to load fails these jobs, not the worker
            for job in batch:
                job.future.set_exception(e)
            return
        if batch[0].kind == "call":
            self._finish(batch[0], lambda job: job.fn(model))  # type: ignore[misc]
            return
        try:
            results = self._run_batch(model, batch)
        except Exception:
            if len(batch) > 1:
                log.warning("a batch of %d jobs failed; retrying them one by one", len(batch), exc_info=True)
            for job in batch:
                self._finish(job, lambda job: self._run_batch(model, [job])[0])
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _finish(self, job: _Job, fn: Callable[[_Job], Any]) -> None:
        try:
            job.future.set_result(fn(job))
        except BaseException as e:
            job.future.set_exception(e)

    def _run_batch(self, model: Any, batch: list[_Job]) -> list[np.ndarray]:
        results: dict[int, np.ndarray] = {}
        for kind in ("image", "text"):
            jobs = [(i, job) for i, job in enumerate(batch) if job.kind == kind]
            if not jobs:
                continue
            items = [item for _, job in jobs for item in job.items]
            t0 = time.perf_counter()
            if kind == "image":
                emb = model.embed_image_batch(np.stack(items))
            else:
                emb = model.encode_texts(items, batch_size=max(len(items), 1))
            seconds = time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.items += len(items)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(items))
            if self.on_batch is not None:
                self.on_batch(kind, len(items), seconds)
            start = 0
            for i, job in jobs:
                results[i] = emb[start : start + job.size]
                start += job.size
        return [results[i] for i in range(len(batch))]
