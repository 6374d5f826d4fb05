"""Keep the library in sync with its folders: scan, reconcile, then embed what is missing in batches.

Reconciling is one transaction (new, changed, moved, copied, restored and vanished files); embedding then
commits each batch from ``clipworks.pipeline.iter_embeddings`` in its own transaction. What still needs a
vector is read back from the database, not remembered, so a run killed at any point leaves a valid file
and the next run carries on where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from clipworks.library.scan import FileStat, file_hash, resolve_root, walk
from clipworks.library.store import TEXT_ARG, FileRow, ModelRow, Store, now, prefix_range, to_blob, to_bytes
from clipworks.runtime.encoder import ClipModel


@dataclass
class IndexReport:
    scanned: int = 0
    unchanged: int = 0
    new: int = 0
    changed: int = 0
    moved: int = 0
    copied: int = 0
    restored: int = 0
    deleted: int = 0
    embedded: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.scanned} files: {self.unchanged} unchanged"]
        for name in ("new", "changed", "moved", "copied", "restored", "deleted", "embedded", "failed"):
            value = getattr(self, name)
            if value:
                parts.append(f"{value} {name}")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def model_identity(clip: ClipModel) -> tuple[str, str]:
    """(name, fingerprint): vectors are only comparable between identical weights."""
    meta = clip.bundle.meta
    return clip.name, meta.source_sha256 or f"{meta.model}::{meta.pretrained}"


def register_model(store: Store, clip: ClipModel) -> ModelRow:
    name, fingerprint = model_identity(clip)
    return store.ensure_model(name, fingerprint, clip.embed_dim, str(clip.bundle.root))


class _HashingModel:
    """Hashes each file in the decoder thread, just before decoding it (the bytes are then in cache)."""

    def __init__(self, model: ClipModel) -> None:
        self.model = model
        self.embed_dim = model.embed_dim
        self.hashes: dict[str, str] = {}

    def preprocess(self, source: Any, mode: Any = None) -> np.ndarray:
        with contextlib.suppress(OSError):  # then preprocess raises BadImage naming the file
            self.hashes[str(source)] = file_hash(source)
        return self.model.preprocess(source, mode)

    def embed_image_batch(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        return self.model.embed_image_batch(pixels, normalize)


def add_roots(
    store: Store, folders: Sequence[str | Path], excludes: Sequence[str] | None
) -> list[tuple[str, list[str]]]:
    """Register folders (their excludes replace the stored ones when given); returns (root, excludes)."""
    known = dict(store.roots())
    out = []
    for folder in folders:
        root = resolve_root(folder)
        patterns = list(excludes) if excludes is not None else known.get(root, [])
        if root not in known or (excludes is not None and known[root] != patterns):
            with store.write() as db:
                db.execute(
                    f"INSERT INTO roots (path, excludes, added_at) VALUES ({TEXT_ARG}, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET excludes = excluded.excludes",
                    (to_bytes(root), json.dumps(patterns), now()),
                )
        out.append((root, patterns))
    return out


def reconcile(store: Store, roots: Sequence[tuple[str, Sequence[str]]], report: IndexReport) -> None:
    """Bring the files table in line with what is on disk under ``roots``, in one transaction."""
    scanned: dict[str, FileStat] = {}
    for root, excludes in roots:
        for stat in walk(root, excludes):
            scanned[stat.path] = stat
    report.scanned = len(scanned)
    known: dict[str, FileRow] = {}
    for root, _ in roots:
        known.update((row.path, row) for row in store.files_under(root))

    changed: list[FileStat] = []
    restored: list[int] = []
    new: list[FileStat] = []
    for path, stat in scanned.items():
        row = known.get(path)
        if row is None:
            new.append(stat)
        elif row.size == stat.size and row.mtime_ns == stat.mtime_ns:
            if row.deleted_at is None:
                report.unchanged += 1
            else:
                restored.append(row.id)
        else:
            changed.append(stat)
    vanished = {row.id: row for path, row in known.items() if path not in scanned and row.deleted_at is None}
    if not (changed or restored or new or vanished):
        return

    t = now()
    with store.write() as db:
        for stat in changed:
            row = known[stat.path]
            db.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, hash = NULL, error = NULL, deleted_at = NULL, "
                "updated_at = ? WHERE id = ?",
                (stat.size, stat.mtime_ns, t, row.id),
            )
            db.execute("DELETE FROM embeddings WHERE file_id = ?", (row.id,))
        report.changed += len(changed)
        db.executemany("UPDATE files SET deleted_at = NULL, updated_at = ? WHERE id = ?", [(t, i) for i in restored])
        report.restored += len(restored)
        for stat in new:
            _add_new(db, stat, vanished, report, t)
        db.executemany("UPDATE files SET deleted_at = ? WHERE id = ?", [(t, i) for i in vanished])
        report.deleted += len(vanished)


def _add_new(db: Any, stat: FileStat, vanished: dict[int, FileRow], report: IndexReport, t: float) -> None:
    """A path not seen before: a moved file (reuse its row), a copy (reuse its vectors), or new."""
    candidates = db.execute(
        "SELECT id, hash, deleted_at FROM files WHERE size = ? AND hash IS NOT NULL", (stat.size,)
    ).fetchall()
    digest = None
    if candidates:
        try:
            digest = file_hash(stat.path)
        except OSError:
            candidates = []
    same = [c for c in candidates if c[1] == digest]
    # Prefer a row whose file is gone (a move) over one still present (a copy).
    gone = [c for c in same if c[0] in vanished or c[2] is not None]
    if gone:
        file_id = gone[0][0]
        db.execute(
            f"UPDATE files SET path = {TEXT_ARG}, size = ?, mtime_ns = ?, deleted_at = NULL, updated_at = ? "
            "WHERE id = ?",
            (to_bytes(stat.path), stat.size, stat.mtime_ns, t, file_id),
        )
        vanished.pop(file_id, None)
        report.moved += 1
        return
    cursor = db.execute(
        f"INSERT INTO files (path, size, mtime_ns, hash, updated_at) VALUES ({TEXT_ARG}, ?, ?, ?, ?)",
        (to_bytes(stat.path), stat.size, stat.mtime_ns, digest, t),
    )
    if same:
        source = same[0][0]
        db.execute(
            "INSERT INTO embeddings (model_id, file_id, vector) SELECT model_id, ?, vector FROM embeddings "
            "WHERE file_id = ?",
            (cursor.lastrowid, source),
        )
        db.execute(
            "UPDATE files SET error = (SELECT error FROM files WHERE id = ?) WHERE id = ?", (source, cursor.lastrowid)
        )
        report.copied += 1
    else:
        report.new += 1


def pending(store: Store, model: ModelRow, roots: Sequence[str]) -> list[tuple[int, str]]:
    """Present, decodable files under ``roots`` without a vector for ``model``, in path order."""
    out: list[tuple[int, str]] = []
    for root in roots:
        low, high = prefix_range(root)
        out += store.conn.execute(
            "SELECT f.id, f.path FROM files f LEFT JOIN embeddings e ON e.file_id = f.id AND e.model_id = ? "
            f"WHERE f.path >= {TEXT_ARG} AND f.path < {TEXT_ARG} AND f.deleted_at IS NULL AND f.error IS NULL "
            "AND e.file_id IS NULL ORDER BY f.path",
            (model.id, to_bytes(low), to_bytes(high)),
        ).fetchall()
    return list(dict(out).items())


def index_folders(
    store: Store,
    clip: ClipModel,
    folders: Sequence[str | Path],
    *,
    excludes: Sequence[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> IndexReport:
    """Scan ``folders`` into the library and embed every file that lacks a vector for ``clip``."""
    from tqdm import tqdm

    from clipworks.pipeline import iter_embeddings

    start = time.perf_counter()
    report = IndexReport()
    model = register_model(store, clip)
    roots = add_roots(store, folders, excludes)
    reconcile(store, roots, report)
    todo = pending(store, model, [r for r, _ in roots])
    if todo:
        ids = {path: file_id for file_id, path in todo}
        hashing = _HashingModel(clip)
        disable = (not sys.stderr.isatty()) if progress is None else not progress
        with tqdm(total=len(todo), unit="img", disable=disable, dynamic_ncols=True) as bar:
            batches = iter_embeddings(
                cast(ClipModel, hashing), [p for _, p in todo], batch_size=batch_size, workers=workers,
                on_skip=lambda f: None, on_progress=bar.update,
            )  # fmt: skip
            for batch in batches:
                t = now()
                with store.write() as db:
                    db.executemany(
                        "INSERT OR REPLACE INTO embeddings (model_id, file_id, vector) VALUES (?, ?, ?)",
                        [(model.id, ids[p], to_blob(v)) for p, v in zip(batch.paths, batch.embeddings, strict=True)],
                    )
                    db.executemany(
                        "UPDATE files SET hash = ?, error = NULL, updated_at = ? WHERE id = ?",
                        [(hashing.hashes.pop(p, None), t, ids[p]) for p in batch.paths],
                    )
                    db.executemany(
                        f"UPDATE files SET hash = ?, error = {TEXT_ARG}, updated_at = ? WHERE id = ?",
                        [(hashing.hashes.pop(f.path, None), to_bytes(f.error), t, ids[f.path]) for f in batch.failures],
                    )
                report.embedded += len(batch.paths)
                report.failed += len(batch.failures)
                report.failures += [(f.path, f.error) for f in batch.failures]
                for f in batch.failures:
                    bar.write(f"warning: skipped {f.path}: {f.error}", file=sys.stderr)
                if on_batch:
                    on_batch(report.embedded)
    report.seconds = time.perf_counter() - start
    return report


def remove_root(store: Store, folder: str | Path) -> int:
    """Forget a folder and every file under it that no other registered folder covers; returns files removed."""
    root = str(Path(folder).expanduser().resolve())
    roots = [r for r, _ in store.roots()]
    if root not in roots:
        listed = ", ".join(roots) or "none"
        from clipworks.errors import UsageError

        raise UsageError(f"{root} is not a library folder (folders: {listed})")
    others = [r for r in roots if r != root]
    covered = [r for r in others if root.startswith(prefix_range(r)[0])]
    removed = 0
    with store.write() as db:
        db.execute(f"DELETE FROM roots WHERE path = {TEXT_ARG}", (to_bytes(root),))
        if not covered:
            inner = [r for r in others if r.startswith(prefix_range(root)[0])]
            low, high = prefix_range(root)
            rows = db.execute(
                f"SELECT id, path FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG}",
                (to_bytes(low), to_bytes(high)),
            ).fetchall()
            gone = [(i,) for i, p in rows if not any(p.startswith(prefix_range(r)[0]) for r in inner)]
            db.executemany("DELETE FROM files WHERE id = ?", gone)
            removed = len(gone)
    return removed
