"""Threaded decode -> batch -> encode, in input order, with bad files skipped and counted.

Decoder threads work ahead of the encoder through a bounded window of futures, so memory stays
bounded and decoding overlaps inference (PIL, numpy and ONNX Runtime all release the GIL).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipworks.display import one_line, quote_path
from clipworks.errors import BadImage, UsageError
from clipworks.imaging import is_image_path
from clipworks.runtime.encoder import ClipModel, PreprocessMode


@dataclass
class Failure:
    path: str
    error: str


@dataclass
class EmbedBatch:
    paths: list[str]
    embeddings: np.ndarray
    failures: list[Failure] = field(default_factory=list)


@dataclass
class EmbedResult:
    paths: list[str]
    embeddings: np.ndarray
    failures: list[Failure]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.paths) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = f", {len(self.failures)} skipped" if self.failures else ""
        return f"embedded {len(self.paths)} images{skipped} in {self.seconds:.1f} s: {self.images_per_s:.1f} images/s"


def collect_image_files(inputs: Sequence[str | Path], *, recursive: bool = True) -> list[Path]:
    """Expand folders into their image files (sorted, hidden ones skipped); files are taken as given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            found.extend(
                sorted(
                    p
                    for p in walker
                    if p.is_file()
                    and is_image_path(p)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path} does not exist; pass image files or folders")
    if not found:
        names = ", ".join(str(i) for i in inputs)
        raise UsageError(f"no images found in {names} (looked for {', '.join(sorted(_extensions()))})")
    return found


def _extensions() -> set[str]:
    from clipworks.imaging import IMAGE_EXTENSIONS

    return set(IMAGE_EXTENSIONS)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def iter_embeddings(
    model: ClipModel,
    sources: Iterable[str | Path],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    queue_size: int | None = None,
    mode: PreprocessMode | None = None,
    on_skip: Callable[[Failure], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[EmbedBatch]:
    """Yield one ``EmbedBatch`` per encoded batch, in input order. Bad files go to ``failures``."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    workers = workers or default_workers()
    window = queue_size or max(2 * batch_size, 4 * workers)
    if window < 1:
        raise UsageError(f"--queue-size must be at least 1, not {queue_size}")
    skip = on_skip or (lambda f: warn(f"skipped {quote_path(f.path)}: {one_line(f.error)}"))
    pending: deque[tuple[str, Future[np.ndarray]]] = deque()
    it = iter(sources)
    paths: list[str] = []
    pixels: list[np.ndarray] = []
    failures: list[Failure] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipworks-decode") as pool:

        def refill() -> None:
            while len(pending) < window:
                src = next(it, None)
                if src is None:
                    return
                pending.append((str(src), pool.submit(model.preprocess, src, mode)))

        refill()
        while pending:
            path, future = pending.popleft()
            refill()
            try:
                pixels.append(future.result())
                paths.append(path)
            except BadImage as e:
                failure = Failure(path, str(e))
                failures.append(failure)
                skip(failure)
            if on_progress:
                on_progress(1)
            if len(pixels) == batch_size:
                yield EmbedBatch(paths, model.embed_image_batch(np.stack(pixels)), failures)
                paths, pixels, failures = [], [], []
        if pixels or failures:
            embeddings = model.embed_image_batch(np.stack(pixels)) if pixels else np.zeros((0, model.embed_dim))
            yield EmbedBatch(paths, embeddings.astype(np.float32), failures)


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
) -> EmbedResult:
    """Embed every file; a progress bar on a terminal (``progress=None`` decides by the terminal)."""
    from tqdm import tqdm

    start = time.perf_counter()
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[Failure] = []
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=len(sources), unit="img", disable=disable, dynamic_ncols=True) as bar:

        def on_skip_with_bar(failure: Failure) -> None:
            line = f"warning: skipped {quote_path(failure.path)}: {one_line(failure.error)}"
            (on_skip or (lambda f: bar.write(line, file=sys.stderr)))(failure)

        for batch in iter_embeddings(
            model, sources, batch_size=batch_size, workers=workers, queue_size=queue_size, mode=mode,
            on_skip=on_skip_with_bar, on_progress=bar.update,
        ):  # fmt: skip
            paths.extend(batch.paths)
            chunks.append(batch.embeddings)
            failures.extend(batch.failures)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.embed_dim), np.float32)
    return EmbedResult(paths, embeddings.astype(np.float32, copy=False), failures, time.perf_counter() - start)
