"""Keep the library in sync with its folders: scan, reconcile, then embed what is missing in batches.

Reconciling is one transaction (new, changed, moved, copied, restored and vanished files); embedding then
commits each batch from ``clipworks.pipeline.iter_embeddings`` (which hashes each file in its decode
thread) in its own transaction. What still needs a vector is read back from the database, not remembered,
so a run killed at any point leaves a valid file and the next run carries on where it stopped. One run at
a time per library (``<db>-index.lock``): a second one waits, then finds the first one's work done
instead of doing it again.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from clipworks.atomic import held_lock
from clipworks.errors import status
from clipworks.library.metadata import UNREAD, UPDATE_METADATA, Metadata, extract_metadata
from clipworks.library.scan import (
    FileStat,
    SkippedFolder,
    excluded_path,
    file_hash,
    library_extensions,
    resolve_root,
    walk,
)  # fmt: skip
from clipworks.library.store import TEXT_ARG, FileRow, ModelRow, Store, now, prefix_range, to_blob, to_bytes
from clipworks.models.fingerprint import model_fingerprint
from clipworks.runtime.encoder import ClipModel, PreprocessMode


def _stored(text: str | None) -> bytes | None:
    """An optional path as the store binds it (see `store.to_bytes`)."""
    return None if text is None else to_bytes(text)


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
    excluded: int = 0  # present on disk but now matched by an exclude: out of search, vectors kept
    embedded: int = 0  # photos and videos
    moments: int = 0  # vectors of the videos embedded
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_folders: list[SkippedFolder] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.scanned} files: {self.unchanged} unchanged"]
        for name in (
            "new", "changed", "moved", "copied", "restored", "deleted", "excluded", "embedded", "moments", "failed",
        ):  # fmt: skip
            value = getattr(self, name)
            if value:
                parts.append(f"{value} {name}")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def register_model(store: Store, clip: ClipModel) -> ModelRow:
    name, weights = model_fingerprint(clip).vectors
    return store.ensure_model(name, weights, clip.embed_dim, str(clip.bundle.root))


class FileFacts(NamedTuple):
    """What the decoder thread learns of a file besides its pixels."""

    hash: str | None
    metadata: Metadata


def read_file_facts(path: str) -> FileFacts:
    """The pipeline's per-file hook, run in the decoder thread just before the file is decoded: the hash,
    then the metadata from the header (both read bytes already in the page cache). An unreadable file
    gets no hash; decoding it then fails naming it. Metadata never fails (see `extract_metadata`)."""
    try:
        digest = file_hash(path)
    except OSError:
        digest = None
    return FileFacts(digest, extract_metadata(path))


class Root(NamedTuple):
    """A library folder and how it is walked (both remembered per folder)."""

    path: str
    excludes: list[str]
    follow_links: bool


def add_roots(
    store: Store, folders: Sequence[str | Path], excludes: Sequence[str] | None, follow_links: bool | None = None
) -> list[Root]:
    """Register folders; ``excludes`` and ``follow_links``, when given, replace what is stored for them."""
    known = dict(store.roots())
    out = []
    for folder in folders:
        root = resolve_root(folder)
        patterns = list(excludes) if excludes is not None else known.get(root, [])
        stored_follow = store.follow_links(root)
        follow = stored_follow if follow_links is None else follow_links
        if root not in known or known[root] != patterns or stored_follow != follow:
            with store.write() as db:
                db.execute(
                    f"INSERT INTO roots (path, excludes, follow_links, added_at) VALUES ({TEXT_ARG}, ?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET excludes = excluded.excludes, "
                    "follow_links = excluded.follow_links",
                    (to_bytes(root), json.dumps(patterns), int(follow), now()),
                )
        out.append(Root(root, patterns, follow))
    return out


def _same_file(row: FileRow, stat: FileStat) -> bool:
    """Whether an unchanged-looking file (same size and mtime) is still the one the row recorded.

    Another inode at the path (a copy, a hard link, a restored backup) is the same photo only when its
    bytes hash the same, which keeps a library moved to another disk from being embedded again.
    """
    if row.dev is None or (row.dev, row.ino) == (stat.dev, stat.ino):
        return True  # a row from before identities were recorded: size and mtime decide, as they did then
    if row.hash is None:
        return False
    try:
        return file_hash(stat.path) == row.hash
    except OSError:
        return False


def reconcile(store: Store, roots: Sequence[Root], report: IndexReport) -> None:
    """Bring the files table in line with what is on disk under ``roots``, in one transaction."""
    scanned: dict[str, FileStat] = {}
    for root in roots:
        found = walk(root.path, root.excludes, follow_links=root.follow_links, on_skip=report.skipped_folders.append,
                     extensions=library_extensions())  # fmt: skip
        scanned.update((stat.path, stat) for stat in found)
    report.scanned = len(scanned)
    known: dict[str, FileRow] = {}
    root_of: dict[int, Root] = {}
    for root in roots:
        for row in store.files_under(root.path):
            known[row.path] = row
            root_of.setdefault(row.id, root)

    changed: list[FileStat] = []
    restored: list[FileStat] = []
    refreshed: list[FileStat] = []  # unchanged content, but its identity (inode, link target) is new
    new: list[FileStat] = []
    for path, stat in scanned.items():
        row = known.get(path)
        if row is None:
            new.append(stat)
            continue
        if row.size != stat.size or row.mtime_ns != stat.mtime_ns or not _same_file(row, stat):
            changed.append(stat)
        elif row.deleted_at is not None:
            restored.append(stat)
        elif (row.dev, row.ino, row.target) != (stat.dev, stat.ino, stat.target):
            refreshed.append(stat)
            report.unchanged += 1
        else:
            report.unchanged += 1
    # A folder that could not be listed says nothing about its files: they are neither gone nor changed.
    unlisted = [prefix_range(f.path)[0] for f in report.skipped_folders if f.kind == "unreadable"]
    absent = {
        row.id: row
        for path, row in known.items()
        if path not in scanned and row.deleted_at is None and not path.startswith(tuple(unlisted))
    }
    if not (changed or restored or refreshed or new or absent):
        return

    t = now()
    with store.write() as db:
        for stat in changed:
            row = known[stat.path]
            db.execute(
                f"UPDATE files SET size = ?, mtime_ns = ?, dev = ?, ino = ?, target = {TEXT_ARG}, hash = NULL, "
                "error = NULL, taken_source = NULL, "  # new content: its metadata is read again
                "deleted_at = NULL, updated_at = ? WHERE id = ?",
                (stat.size, stat.mtime_ns, stat.dev, stat.ino, _stored(stat.target), t, row.id),
            )
            db.execute("DELETE FROM embeddings WHERE file_id = ?", (row.id,))
            db.execute("DELETE FROM moments WHERE file_id = ?", (row.id,))  # a changed video is sampled again
            db.execute("DELETE FROM videos WHERE file_id = ?", (row.id,))
        report.changed += len(changed)
        db.executemany(
            f"UPDATE files SET dev = ?, ino = ?, target = {TEXT_ARG}, deleted_at = NULL, updated_at = ? WHERE id = ?",
            [(s.dev, s.ino, _stored(s.target), t, known[s.path].id) for s in restored + refreshed],
        )
        report.restored += len(restored)
        for stat in new:
            _add_new(db, stat, absent, report, t)
        # Gone from disk, or still there but excluded now: out of search either way, the row and its
        # vectors kept, so a file that comes back (or is included again) is not embedded again.
        db.executemany("UPDATE files SET deleted_at = ? WHERE id = ?", [(t, i) for i in absent])
        excluded = sum(excluded_path(root_of[i].path, row.path, root_of[i].excludes) for i, row in absent.items())
        report.excluded += excluded
        report.deleted += len(absent) - excluded


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
            f"UPDATE files SET path = {TEXT_ARG}, size = ?, mtime_ns = ?, dev = ?, ino = ?, target = {TEXT_ARG}, "
            "deleted_at = NULL, updated_at = ? WHERE id = ?",
            (to_bytes(stat.path), stat.size, stat.mtime_ns, stat.dev, stat.ino, _stored(stat.target), t, file_id),
        )
        vanished.pop(file_id, None)
        report.moved += 1
        return
    cursor = db.execute(
        f"INSERT INTO files (path, size, mtime_ns, dev, ino, target, hash, updated_at) "
        f"VALUES ({TEXT_ARG}, ?, ?, ?, ?, {TEXT_ARG}, ?, ?)",
        (to_bytes(stat.path), stat.size, stat.mtime_ns, stat.dev, stat.ino, _stored(stat.target), digest, t),
    )
    if same:
        source = same[0][0]
        db.execute(
            "INSERT INTO embeddings (model_id, file_id, vector) SELECT model_id, ?, vector FROM embeddings "
            "WHERE file_id = ?",
            (cursor.lastrowid, source),
        )
        # A copy of a video gets its moments too.
        copied = (("moments", "model_id, ordinal, time, vector"), ("videos", "model_id, every_s, moments"))
        for table, columns in copied:
            db.execute(
                f"INSERT INTO {table} (file_id, {columns}) SELECT ?, {columns} FROM {table} WHERE file_id = ?",
                (cursor.lastrowid, source),
            )
        db.execute(
            "UPDATE files SET error = (SELECT error FROM files WHERE id = ?) WHERE id = ?", (source, cursor.lastrowid)
        )
        report.copied += 1
    else:
        report.new += 1


def pending(
    store: Store, model: ModelRow, roots: Sequence[str], video_every: float | None = None
) -> list[tuple[int, str]]:
    """Present, decodable files under ``roots`` that ``model`` has not embedded, in path order: photos
    without a vector, videos not sampled (or, when ``video_every`` is given, sampled at another interval).
    A photo never has a ``videos`` row nor a video an ``embeddings`` one, so one condition serves both."""
    out: list[tuple[int, str]] = []
    for root in roots:
        low, high = prefix_range(root)
        out += store.conn.execute(
            "SELECT f.id, f.path FROM files f LEFT JOIN embeddings e ON e.file_id = f.id AND e.model_id = ? "
            "LEFT JOIN videos v ON v.file_id = f.id AND v.model_id = ? "
            f"WHERE f.path >= {TEXT_ARG} AND f.path < {TEXT_ARG} AND f.deleted_at IS NULL AND f.error IS NULL "
            "AND e.file_id IS NULL AND (v.file_id IS NULL OR v.every_s != coalesce(?, v.every_s)) "
            "ORDER BY f.path",
            (model.id, model.id, to_bytes(low), to_bytes(high), video_every),
        ).fetchall()
    return list(dict(out).items())


@contextlib.contextmanager
def index_lock(db: Path) -> Iterator[None]:
    """Hold the library's index lock (``<db>-index.lock``); says once that it waits when another run has it.
    Where the lock file cannot be made (a read-only folder) the run goes on without it: its first write to
    the database fails then with the database's own message."""

    def waiting(holder: str) -> None:
        status(f"waiting for another index run on {db}{f' (pid {holder})' if holder else ''} to finish")

    with held_lock(db.with_name(db.name + "-index.lock"), waiting):
        yield


def index_folders(
    store: Store,
    clip: ClipModel,
    folders: Sequence[str | Path],
    *,
    excludes: Sequence[str] | None = None,
    follow_links: bool | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    decode: PreprocessMode = "fast",
    progress: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
    video_every: float | None = None,
) -> IndexReport:
    """Scan ``folders`` into the library and embed every file that lacks a vector for ``clip``: a photo
    gets one, a video one per moment (`clipworks.library.videos`).

    ``excludes`` and ``follow_links`` (follow symlinked folders out of a folder) are remembered per folder
    when given. ``video_every`` (seconds between a video's regular moments) samples new videos at that
    interval and those sampled at another one again; None samples new ones at `DEFAULT_VIDEO_EVERY_S`.
    One run at a time per library: a second one waits for the first, then finds its work done.
    ``decode`` "fast" (the default: its embedding cosine to "exact" measured at 0.999 or more, RESULTS.md)
    or "exact" (open_clip's pixels) for photos; the model row records it and the precision (``index status``).
    """
    from clipworks.library.videos import DEFAULT_VIDEO_EVERY_S, check_video_every, embed_videos
    from clipworks.video.frames import is_video

    if video_every is not None:
        check_video_every(video_every)
    start = time.perf_counter()
    report = IndexReport()
    with index_lock(store.path):
        model = register_model(store, clip)
        roots = add_roots(store, folders, excludes, follow_links)
        reconcile(store, roots, report)
        todo = pending(store, model, [r.path for r in roots], video_every)
        photos = [(i, p) for i, p in todo if not is_video(p)]
        videos = [(i, p) for i, p in todo if is_video(p)]
        _embed(store, clip, model, photos, report, batch_size=batch_size, workers=workers, decode=decode,
               progress=progress, on_batch=on_batch)  # fmt: skip
        embed_videos(store, clip, model, videos, report, every_s=video_every or DEFAULT_VIDEO_EVERY_S,
                     batch_size=batch_size, progress=progress, on_batch=on_batch)  # fmt: skip
        read_missing_metadata(store, [r.path for r in roots])
    report.seconds = time.perf_counter() - start
    return report


def _embed(
    store: Store,
    clip: ClipModel,
    model: ModelRow,
    todo: list[tuple[int, str]],
    report: IndexReport,
    *,
    batch_size: int,
    workers: int | None,
    decode: PreprocessMode,
    progress: bool | None,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Embed ``todo`` (file id, path) in batches, each committed with its hashes and decode errors."""
    from tqdm import tqdm

    from clipworks.imaging import describe_decode
    from clipworks.pipeline import iter_embeddings

    if not todo:
        return
    # Recorded before the first vector is written, so an interrupted run leaves no unexplained vectors.
    store.record_production(model.id, clip.precision, describe_decode(clip.preprocess_cfg, decode))
    ids = {path: file_id for file_id, path in todo}
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=len(todo), unit="img", disable=disable, dynamic_ncols=True) as bar:
        batches = iter_embeddings(
            clip, [p for _, p in todo], batch_size=batch_size, workers=workers, mode=decode, on_item=read_file_facts,
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
                    [(facts.hash, t, ids[p]) for p, facts in zip(batch.paths, batch.extras, strict=True)],
                )
                db.executemany(
                    UPDATE_METADATA,
                    [(*facts.metadata.row(), ids[p]) for p, facts in zip(batch.paths, batch.extras, strict=True)],
                )
                db.executemany(
                    f"UPDATE files SET hash = ?, error = {TEXT_ARG}, updated_at = ? WHERE id = ?",
                    [(f.extra.hash, to_bytes(f.error), t, ids[f.path]) for f in batch.failures],
                )
            report.embedded += len(batch.paths)
            report.failed += len(batch.failures)
            report.failures += [(f.path, f.error) for f in batch.failures]
            for f in batch.failures:
                bar.write(f"warning: skipped {f.path}: {f.error}", file=sys.stderr)
            if on_batch:
                on_batch(report.embedded)


def read_missing_metadata(store: Store, roots: Sequence[str], chunk: int = 256) -> int:
    """Read the metadata of embedded files that have none yet (indexed before schema 3, copies, imports
    that now lie under a folder), a chunk per transaction; returns how many were read."""
    done = 0
    for root in roots:
        low, high = prefix_range(root)
        rows = store.conn.execute(
            f"SELECT id, path, mtime_ns FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG} "
            f"AND deleted_at IS NULL AND error IS NULL AND {UNREAD} ORDER BY path",
            (to_bytes(low), to_bytes(high)),
        ).fetchall()
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            with store.write() as db:
                db.executemany(UPDATE_METADATA, [(*extract_metadata(p, m).row(), i) for i, p, m in part])
            done += len(part)
    return done


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
    with index_lock(store.path), store.write() as db:  # not under an index run still embedding its files
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
