"""The live prompt set: Hailo's JSON file, edited while the stream runs (or read-only, text encoder never loaded)."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from clipworks.errors import UsageError
from clipworks.prompts import HAILO_SLOTS, PromptEntry, PromptSet, encode_entries

DEFAULT_TEXTS = ("person", "car", "bicycle")
T = TypeVar("T")
# One row of an edit: (text, negative, ensemble).
Row = tuple[str, bool, bool]


class PromptState:
    """Copy-on-write holder: the processing loop reads ``current`` lock-free; edits swap in a new set.

    ``encode_texts`` None means offline (``--disable-runtime-prompts``): the file is only read, and
    editing a text is refused (the threshold and the Negative/Ensemble flags of encoded entries still change).

    Other threads (the web page) do not edit directly: they ``submit`` an edit and the processing loop
    runs it in ``apply_pending`` between frames, so the loop stays the only user of the model.
    """

    def __init__(self, prompt_set: PromptSet, path: Path, encode_texts: Callable[[list[str]], np.ndarray] | None):
        self.current = prompt_set
        self.path = path
        self.encode_texts = encode_texts
        self.version = 0
        self._lock = threading.Lock()
        self._pending: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()

    @property
    def online(self) -> bool:
        return self.encode_texts is not None

    @classmethod
    def open(
        cls, path: Path, encode_texts: Callable[[list[str]], np.ndarray] | None, *, create: bool = True
    ) -> PromptState:
        """Load ``path``; when it is missing and prompts are online, start from a few default prompts and
        write them to ``path`` if ``create`` (else they live in memory until saved)."""
        if path.is_file():
            ps = PromptSet.load(path)
            if encode_texts is not None and any(e.text and e.embedding is None for e in ps.entries):
                encode_entries(ps, encode_texts, only_missing=True)
        elif encode_texts is None:
            raise UsageError(
                f"--json-path {path}: no such file, and --disable-runtime-prompts cannot create it without the "
                "text encoder; write it first (clipworks embed texts ... --model ...) or drop the flag"
            )
        else:
            ps = PromptSet.from_texts(DEFAULT_TEXTS)
            encode_entries(ps, encode_texts)
            if create:
                ps.save(path)
        while len(ps.entries) < HAILO_SLOTS:
            ps.entries.append(PromptEntry(""))
        return cls(ps, path, encode_texts)

    # -- edits, posted by other threads and run by the processing loop ----------------------------
    def submit(self, edit: Callable[[], T]) -> Future[T]:
        """Queue ``edit`` (for example ``lambda: state.update(...)``) for the loop; the future gives its result."""
        fut: Future[T] = Future()
        self._pending.put((edit, fut))
        return fut

    def apply_pending(self) -> int:
        """Run the queued edits (called by the processing loop between frames); returns how many ran."""
        done = 0
        while True:
            try:
                edit, fut = self._pending.get_nowait()
            except queue.Empty:
                return done
            if fut.set_running_or_notify_cancel():  # False: the poster gave up waiting
                try:
                    fut.set_result(edit())
                except Exception as e:  # handed to the poster through the future
                    fut.set_exception(e)
                done += 1

    def set_entry(self, index: int, text: str, negative: bool, ensemble: bool) -> None:
        self.update({index: (text, negative, ensemble)})

    def update(self, rows: dict[int, Row] | None = None, threshold: float | None = None,
               *, replace: Sequence[Row] | None = None) -> None:  # fmt: skip
        """Change rows (index -> text, negative, ensemble) and/or the threshold as one edit.

        ``replace`` gives the whole set instead: its rows, then empty slots up to six. Changed texts
        (and entries whose Ensemble flag changed) are encoded in one call; the new set is swapped in at once.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be between 0 and 1, not {threshold}")
        with self._lock:
            ps = copy.deepcopy(self.current)
            if replace is not None:
                if len(replace) > max(HAILO_SLOTS, len(ps.entries)):
                    raise UsageError(f"{len(replace)} prompt rows given; at most {HAILO_SLOTS}")
                rows = dict(enumerate(replace))
                rows.update({i: ("", False, False) for i in range(len(replace), len(ps.entries))})
            encode: list[int] = []
            for index, (text, negative, ensemble) in sorted((rows or {}).items()):
                if not 0 <= index < len(ps.entries):
                    raise UsageError(f"prompt row {index} does not exist (0 to {len(ps.entries) - 1})")
                old = ps.entries[index]
                text = text.strip()
                needs_encoding = bool(text) and (text != old.text or ensemble != old.ensemble or old.embedding is None)
                if needs_encoding:
                    encode.append(index)
                ps.entries[index] = PromptEntry(text, None if needs_encoding or not text else old.embedding,
                                                negative, ensemble, extra=old.extra)  # fmt: skip
            if encode and self.encode_texts is None:
                raise UsageError("prompts are read-only (--disable-runtime-prompts): texts cannot be encoded")
            if threshold is not None:
                ps.threshold = float(threshold)
            if encode:
                assert self.encode_texts is not None
                encode_entries(ps, self.encode_texts, only_missing=True)
            self._swap(ps)

    def set_threshold(self, threshold: float) -> None:
        self.update(threshold=threshold)

    def save(self, path: Path | None = None) -> Path:
        with self._lock:
            return self.current.save(path or self.path)

    def load(self, path: Path | None = None) -> None:
        path = path or self.path
        if not path.is_file():
            raise UsageError(f"{path}: no such prompt file; save the prompts first")
        fresh = PromptState.open(path, self.encode_texts).current
        with self._lock:
            self._swap(fresh)

    def _swap(self, ps: PromptSet) -> None:
        self.current = ps
        self.version += 1

    def to_json(self) -> dict[str, Any]:
        ps = self.current
        return {
            "threshold": ps.threshold,
            "online": self.online,
            "path": str(self.path),
            "version": self.version,
            "entries": [{"text": e.text, "negative": e.negative, "ensemble": e.ensemble} for e in ps.entries],
        }
