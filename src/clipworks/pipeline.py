"""The one producer/consumer pipeline: threads decode ahead of one consumer, bounded, in order, cancellable.

``Pipeline`` is the thread core: ``work`` runs on each item in worker threads and the results reach one
consumer in input order, at most ``window`` ahead of it, so memory stays bounded and decoding overlaps
inference (PIL, PyAV, numpy and ONNX Runtime all release the GIL). ``iter_embeddings`` builds the
decode -> batch -> encode loop on it, with a per-item hook that runs in the decode thread; ``embed
images``, the library indexer, video features and (through ``Pipeline`` itself) the stream sources use it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from clipworks.display import one_line, quote_path
from clipworks.errors import BadImage, UsageError
from clipworks.runtime.encoder import ClipModel, PreprocessMode

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.1  # how often a waiting thread looks at the cancel event (set from any thread, no notify)


class Pipeline(Generic[T, R]):
    """``work(item)`` for every item of ``items`` in ``workers`` threads; the results, in input order.

    The items are taken in the worker threads, one at a time: a generator that decodes a video runs in
    the worker, not in the consumer, and the last worker out closes it, so a container is closed by the
    thread that opened it. At most ``window`` items are taken and not yet handed over. An exception from
    ``items`` or ``work`` ends the pipeline: the results before it are still handed over, then the consumer
    gets the exception. ``cancel`` (an event any thread may set), ``close()``, or a consumer that stops
    iterating stops every worker after the item it is on; iteration then simply ends.

    ``latest=True`` is for live sources (with one worker): a camera cannot be paused, so a bounded queue
    would only make a slow consumer fall ever further behind real time. The hand-over then holds only the
    newest result and drops (and counts in ``dropped``) one the consumer has not taken when the next
    arrives. Threads, cancellation, errors and the end are the same as in the ordered pipeline.
    """

    def __init__(
        self,
        work: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int = 1,
        window: int = 8,
        latest: bool = False,
        cancel: threading.Event | None = None,
        name: str = "clipworks-pipeline",
    ) -> None:
        if workers < 1 or window < 1:
            raise ValueError(f"a pipeline needs at least 1 worker and a window of 1, not {workers} and {window}")
        if latest and workers != 1:
            raise ValueError("latest=True hands over the newest result of one worker; use workers=1")
        self.work = work
        self.workers = workers
        self.window = window
        self.latest = latest
        self.cancel = cancel
        self.name = name
        self.dropped = 0
        self._items = items
        self._source: Iterator[T] = iter(items)
        self._halt = threading.Event()  # close(): ours, so a caller's shared cancel event is never set
        self._take = threading.Lock()  # one worker advances the source at a time
        self._cond = threading.Condition()
        self._results: dict[int, R] = {}
        self._next_in = 0  # sequence number of the next item taken
        self._next_out = 0  # sequence number of the next result handed over
        self._end: int | None = None  # no result at or after this sequence number
        self._error: BaseException | None = None
        self._running = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> Pipeline[T, R]:
        self._running = self.workers
        for i in range(self.workers):
            name = self.name if self.workers == 1 else f"{self.name}-{i}"
            thread = threading.Thread(target=self._worker, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _cancelled(self) -> bool:
        return self._halt.is_set() or (self.cancel is not None and self.cancel.is_set())

    # -- workers ---------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            while (taken := self._take_next()) is not None:
                seq, item = taken
                try:
                    result = self.work(item)
                except BaseException as e:  # handed to the consumer, which raises it there
                    self._finish(seq, e)
                    return
                with self._cond:
                    if self.latest and self._results:
                        self._results.clear()
                        self.dropped += 1
                    self._results[seq] = result
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._running -= 1
                last = self._running == 0
                self._cond.notify_all()
            close = getattr(self._items, "close", None)
            if last and close is not None:
                close()

    def _take_next(self) -> tuple[int, T] | None:
        """Reserve a place in the window and take the next item; None when the worker should stop."""
        with self._take:
            with self._cond:
                while not self._stopped() and not self.latest and self._next_in - self._next_out >= self.window:
                    self._cond.wait(_POLL_S)
                if self._stopped():
                    return None
                seq = self._next_in
            try:
                item = next(self._source)
            except StopIteration:
                self._finish(seq, None)
                return None
            except BaseException as e:
                self._finish(seq, e)
                return None
            with self._cond:
                self._next_in = seq + 1
            return seq, item

    def _finish(self, seq: int, error: BaseException | None) -> None:
        with self._cond:
            if self._end is None or seq < self._end:
                self._end, self._error = seq, error
            self._cond.notify_all()

    def _stopped(self) -> bool:
        return self._cancelled() or self._end is not None

    # -- the consumer ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Every result handed over, or the pipeline cancelled: nothing more will come."""
        with self._cond:
            return self._exhausted()

    def _exhausted(self) -> bool:
        ended = self._end is not None and self._next_out >= self._end and self._error is None
        return ended or self._cancelled()

    def _next(self, timeout: float | None) -> tuple[bool, R | None]:
        """(True, result), or (False, None) when none came within ``timeout`` or nothing more will come."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._exhausted():
                ready = min(self._results) if self.latest and self._results else self._next_out
                if ready in self._results:
                    self._next_out = ready + 1
                    self._cond.notify_all()  # a place in the window is free
                    return True, self._results.pop(ready)
                if self._end is not None and self._next_out >= self._end and self._error is not None:
                    error, self._error = self._error, None
                    raise error
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)
        return False, None

    def poll(self, timeout: float | None = None) -> R | None:
        """The next result, or None when none came within ``timeout`` (see ``done``).

        An exception the items or the work raised is raised here, once, after the results before it.
        """
        return self._next(timeout)[1]

    def __iter__(self) -> Iterator[R]:
        """Every result in order; the workers are stopped however the loop ends (break, error, Ctrl-C)."""
        if not self._threads:
            self.start()
        try:
            while True:
                got, result = self._next(None)
                if not got:
                    return
                yield result  # type: ignore[misc]  # got: a result of work
        finally:
            self.close()

    def close(self, timeout: float | None = None) -> None:
        """Stop the workers after their current item and wait for them (at most ``timeout`` s each)."""
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def __enter__(self) -> Pipeline[T, R]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- decode -> batch -> encode ---------------------------------------------------------------------


@dataclass
class Failure:
    path: str
    error: str
    extra: Any = None  # what the ``on_item`` hook returned for this item


@dataclass
class EmbedBatch:
    """One encoded batch: ``keys[i]`` names row ``i`` (a file's path, a frame's time)."""

    keys: list[Any]
    embeddings: np.ndarray
    failures: list[Failure] = field(default_factory=list)  # items skipped since the previous batch
    extras: list[Any] = field(default_factory=list)  # the ``on_item`` hook's value for each row

    @property
    def paths(self) -> list[str]:
        """The keys of a batch of files: their paths."""
        return self.keys


@dataclass
class EmbedResult:
    paths: list[str]
    embeddings: np.ndarray
    failures: list[Failure]
    seconds: float
    streamed: int = 0  # images handed to ``embed_files``'s ``on_batch`` instead of kept in ``paths``

    @property
    def count(self) -> int:
        return len(self.paths) + self.streamed

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = f", {len(self.failures)} skipped" if self.failures else ""
        return f"embedded {self.count} images{skipped} in {self.seconds:.1f} s: {self.images_per_s:.1f} images/s"


def collect_image_files(inputs: Sequence[str | Path], *, recursive: bool = True) -> list[Path]:
    """Expand folders into their image files (the library's walk: same extensions, hidden names skipped,
    sorted); files are taken as given. Folders that cannot be listed are named in a warning."""
    from clipworks.library.scan import SkippedFolder, image_extensions, walk

    def skipped(folder: SkippedFolder) -> None:
        if folder.kind == "unreadable":
            warn(f"skipped folder {quote_path(folder.path)}: {one_line(folder.detail)}")

    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = walk(str(path), on_skip=skipped, recursive=recursive)
            found.extend(sorted(Path(f.path) for f in files))
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path} does not exist; pass image files or folders")
    if not found:
        names = ", ".join(str(i) for i in inputs)
        raise UsageError(f"no images found in {names} (looked for {', '.join(sorted(image_extensions()))})")
    return found


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class _Decoded:
    key: Any
    pixels: np.ndarray | None
    error: str | None
    extra: Any


def iter_embeddings(
    model: ClipModel,
    sources: Iterable[Any],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    queue_size: int | None = None,
    mode: PreprocessMode | None = None,
    decode: Callable[[Any], np.ndarray] | None = None,
    key: Callable[[Any], Any] = str,
    normalize: bool = True,
    skip: tuple[type[Exception], ...] = (BadImage,),
    on_item: Callable[[Any], Any] | None = None,
    on_skip: Callable[[Failure], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    name: str = "clipworks-decode",
) -> Iterator[EmbedBatch]:
    """Yield one ``EmbedBatch`` per encoded batch, in input order.

    Each source is decoded in a worker thread by ``decode`` (default: ``model.preprocess(source, mode)``)
    and named by ``key(source)``. ``on_item(source)`` runs in that thread just before decoding (the bytes
    are then in the page cache: hash them, say); what it returns comes back in ``extras`` (or the
    failure's ``extra``). A source whose decode raises one of ``skip`` goes to ``failures`` and is
    reported to ``on_skip`` (default: a warning naming it); any other exception ends the run. Failures come
    with the batch after them, or in a batch of their own once ``batch_size`` of them wait with no image. ``cancel``
    set from another thread ends it after the items in flight.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    workers = workers or default_workers()
    window = queue_size or max(2 * batch_size, 4 * workers)
    if window < 1:
        raise UsageError(f"--queue-size must be at least 1, not {queue_size}")
    report = on_skip or (lambda f: warn(f"skipped {quote_path(f.path)}: {one_line(f.error)}"))
    share = getattr(model, "share_cores_with_decoders", None)  # callers may pass any object with the encoders
    if share is not None:
        share()
    preprocess = decode or (lambda source: model.preprocess(source, mode))

    def decode_one(source: Any) -> _Decoded:
        extra = on_item(source) if on_item else None
        try:
            return _Decoded(key(source), preprocess(source), None, extra)
        except skip as e:
            return _Decoded(key(source), None, str(e), extra)

    def encode(batch: list[_Decoded], failures: list[Failure]) -> EmbedBatch:
        if batch:
            embeddings = model.embed_image_batch(np.stack([d.pixels for d in batch]), normalize=normalize)
        else:
            embeddings = np.zeros((0, model.embed_dim), np.float32)
        return EmbedBatch([d.key for d in batch], embeddings, failures, [d.extra for d in batch])

    batch: list[_Decoded] = []
    failures: list[Failure] = []
    with Pipeline(decode_one, sources, workers=workers, window=window, cancel=cancel, name=name) as decoded_items:
        for decoded in decoded_items:
            if decoded.pixels is None:
                failure = Failure(str(decoded.key), decoded.error or "", decoded.extra)
                failures.append(failure)
                report(failure)
            else:
                batch.append(decoded)
            if on_progress:
                on_progress(1)
            # A run of failures with no image waiting goes out on its own, so an outage (every URL failing)
            # does not pile up failures until a batch fills; with images waiting, they keep their batch's order.
            if len(batch) == batch_size or (not batch and len(failures) >= batch_size):
                yield encode(batch, failures)
                batch, failures = [], []
    if batch or failures:
        yield encode(batch, failures)


def embed_files(
    model: ClipModel,
    sources: Sequence[str | Path],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    queue_size: int | None = None,
    mode: PreprocessMode | None = None,
    progress: bool | None = None,
    on_skip: Callable[[Failure], None] | None = None,
    on_batch: Callable[[EmbedBatch], None] | None = None,
) -> EmbedResult:
    """Embed every file; a progress bar on a terminal (``progress=None`` decides by the terminal).

    ``on_batch`` takes each batch as it is encoded (to stream it to a file) and the result then keeps
    none of them: memory stays bounded however many files there are.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[Failure] = []
    streamed = 0
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=len(sources), unit="img", disable=disable, dynamic_ncols=True) as bar:

        def on_skip_with_bar(failure: Failure) -> None:
            line = f"warning: skipped {quote_path(failure.path)}: {one_line(failure.error)}"
            (on_skip or (lambda f: bar.write(line, file=sys.stderr)))(failure)

        for batch in iter_embeddings(
            model, sources, batch_size=batch_size, workers=workers, queue_size=queue_size, mode=mode,
            on_skip=on_skip_with_bar, on_progress=bar.update,
        ):  # fmt: skip
            failures.extend(batch.failures)
            if on_batch is not None:
                on_batch(batch)
                streamed += len(batch.paths)
                continue
            paths.extend(batch.paths)
            chunks.append(batch.embeddings)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.embed_dim), np.float32)
    seconds = time.perf_counter() - start
    return EmbedResult(paths, embeddings.astype(np.float32, copy=False), failures, seconds, streamed)
