"""Datasets in, clip-retrieval's layout out: ``clipworks embed dataset``.

Inputs are WebDataset tar shards (brace patterns such as ``shards/{00000..00123}.tar``), Parquet or CSV
tables of image paths or URLs with captions, and folders of images; any path may be an ``fsspec`` URL
(``s3://``, ``gs://``, ...) when that filesystem's package is installed. Every sample gets a place in
one input order; output shard ``i`` holds the samples ``[i * shard_size, (i + 1) * shard_size)`` of it, so
a job started again after a crash skips the finished shards (their samples are passed over undecoded) and
writes the rest exactly as the first run would have.

The output is what clip-retrieval's ``inference`` writes and autofaiss and ``clip-retrieval index`` read:
``img_emb/img_emb_{i}.npy`` and ``text_emb/text_emb_{i}.npy`` (unit vectors as float16, one row per
embedded sample) and ``metadata/metadata_{i}.parquet`` (the same rows: ``key``, ``image_path``, ``caption``,
``width``, ``height``). Samples that could not be embedded go to ``errors/errors_{i}.parquet`` with the
reason, not into the metadata: clip-retrieval pairs metadata rows with embedding rows by position.
``job.json`` records the model and the sharding, so a folder is never resumed with another model.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipworks.display import one_line, quote_path
from clipworks.errors import BadImage, ClipworksError, UsageError
from clipworks.extras import MissingExtra, require
from clipworks.outputs import (
    SHARD_DTYPE,
    ShardWriter,
    finished_shards,
    parquet_text,
    pyarrow_modules,
    shard_failures,
    shard_finished,
    shard_samples,
)
from clipworks.pipeline import iter_embeddings, warn
from clipworks.runtime.encoder import ClipModel

INPUT_FORMATS = ("files", "webdataset", "parquet", "csv")
JOB_FILE = "job.json"
JOB_FORMAT = "clipworks-dataset/1"
DEFAULT_SHARD_SIZE = 100_000
# WebDataset names a sample's files KEY.EXT; the image is the first of these extensions the sample has.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
WDS_CAPTION_EXTENSION = "txt"
IMAGE_COLUMNS = ("image_path", "path", "url", "filepath", "file")
CAPTION_COLUMNS = ("caption", "text", "txt")
# A sample's file is read whole before its header is looked at, and ~64 are in flight at once: one larger
# than this (a 100-megapixel photo is 20-60 MB as JPEG) is an error row, not gigabytes of memory.
MAX_SAMPLE_BYTES = 256 * 2**20


@dataclass
class Sample:
    """One image of the dataset, in input order: ``index`` places it in its shard."""

    index: int
    key: str
    image_path: str  # the file, the URL, or (in a tar shard) the sample's key, as clip-retrieval records it
    caption: str | None = None
    data: bytes | None = None  # the image's bytes when the reader has them (tar members); else read image_path
    error: str | None = None  # what made the sample unusable before decoding (a caption that is not text)
    shard: str | None = None  # the tar it came from
    width: int | None = None
    height: int | None = None

    def __str__(self) -> str:
        """The sample as a message names it: its file, or its key in its tar."""
        return f"{self.key} in {self.shard}" if self.shard else self.image_path

    def row(self) -> dict[str, Any]:
        return {"key": self.key, "image_path": self.image_path, "caption": self.caption,
                "width": self.width, "height": self.height}  # fmt: skip


# -- input names -------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b (zero padding kept from the bounds), ``{x,y}`` -> x y; nested
    groups expand left to right. A pattern without braces is itself."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if (rng := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)) is not None:
        lo, hi = rng.group(1), rng.group(2)
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # "{}" or "{word}": not a pattern, kept as written
        return [head + "{" + body + "}" + name for name in expand_braces(tail)]
    return [head + choice + name for choice in choices for name in expand_braces(tail)]


def _is_url(path: str) -> bool:
    return "://" in path


def _filesystem(path: str) -> tuple[Any, str]:
    """fsspec's filesystem for a URL and the path inside it; a protocol whose package is missing is one line."""
    require("fsspec", "dataset", f"reading {path}")
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as e:  # fsspec's message names the package the protocol needs (s3fs, gcsfs ...)
        raise MissingExtra(f"reading {path}: {one_line(str(e))}") from e
    except ValueError as e:  # an unknown protocol
        raise UsageError(f"cannot read {path}: {one_line(str(e))}") from e
    except OSError as e:  # a filesystem that cannot start (HDFS without Java): its first line says why
        raise UsageError(f"cannot read {path}: {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return one_line(lines[0]) if lines else type(error).__name__


def _open(path: str) -> IO[bytes]:
    """A local file, or an fsspec URL (``s3://``, ``gs://``, ``http://`` ...) through its filesystem."""
    if not _is_url(path):
        return open(path, "rb")  # the caller closes it
    fs, inner = _filesystem(path)
    return fs.open(inner, "rb")


def _exists(path: str) -> bool:
    if not _is_url(path):
        return os.path.exists(path)
    fs, inner = _filesystem(path)
    try:
        return bool(fs.exists(inner))
    except OSError as e:  # unreachable (network, credentials): a missing input, said in one line
        raise UsageError(f"cannot read {path}: {_first_line(e)}") from e


def guess_format(path: str) -> str:
    name = path.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if not _is_url(path) and os.path.isdir(path):
        return "files"
    raise UsageError(f"cannot tell the format of {path}; pass --input-format {'|'.join(INPUT_FORMATS)}")


def resolve_inputs(inputs: Sequence[str], input_format: str | None) -> tuple[list[str], str]:
    """Brace patterns expanded, each input checked to exist, and the one format they share."""
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise UsageError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not {input_format!r}")
    paths = [path for pattern in inputs for path in expand_braces(str(pattern))]
    if not paths:
        raise UsageError("no inputs given")
    for path in paths:
        if not _exists(path):
            raise UsageError(f"input {path} does not exist")
    fmt = input_format or guess_format(paths[0])
    if input_format is None and (other := next((p for p in paths if guess_format(p) != fmt), None)):
        raise UsageError(f"inputs mix formats ({paths[0]} is {fmt}, {other} is not); embed them as separate jobs")
    return paths, fmt


# -- readers: every one yields Samples in one fixed order -----------------------------------------------


def _caption_text(raw: bytes, where: str) -> str | None:
    """A caption file's text; an empty one is no caption, as an empty table cell is."""
    try:
        return raw.decode("utf-8").strip() or None
    except UnicodeDecodeError as e:
        raise ValueError(f"caption of {where} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _too_large(where: object, size: int | None = None) -> str:
    held = f"{size:,} bytes" if size is not None else "its size"
    return f"{where}: {held} is over the {MAX_SAMPLE_BYTES:,}-byte limit for one image; shrink or skip it"


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last part, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_webdataset(shards: Sequence[str], wanted: Callable[[int], bool], start: int = 0) -> Iterator[Sample]:
    """Samples of WebDataset tars, streamed member by member (nothing is extracted to disk).

    The members of one sample are consecutive, as WebDataset's writer puts them; the members of a sample
    that is not ``wanted`` are passed over unread. A truncated or corrupt tar keeps the samples read before
    the damage, with a one-line warning naming it.
    """
    index = start
    for shard in shards:
        with _open(shard) as fh:
            members: dict[str, bytes] = {}
            oversized: dict[str, int] = {}
            key: str | None = None
            keep = False
            read = 0
            try:
                # Stream mode ("r|*"): one pass in order, gzip or not, and no member list kept.
                with tarfile.open(fileobj=fh, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        member_key, ext = _split_member(member.name)
                        if member_key != key:
                            if key is not None:
                                yield _wds_sample(index, key, members, shard, keep, oversized)
                                index, read, members, oversized = index + 1, read + 1, {}, {}
                            key, keep = member_key, wanted(index)
                        if keep and (ext in WDS_IMAGE_EXTENSIONS or ext == WDS_CAPTION_EXTENSION):
                            if member.size > MAX_SAMPLE_BYTES:  # passed over unread: the tar streams past it
                                oversized[ext] = member.size
                                continue
                            extracted = tar.extractfile(member)
                            members[ext] = extracted.read() if extracted is not None else b""
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                warn(f"{quote_path(shard)} is truncated or corrupt after {read} samples ({one_line(str(e))}); "
                     "kept those")  # fmt: skip
                key = None  # the sample being read when the damage came may be incomplete
            if key is not None:
                yield _wds_sample(index, key, members, shard, keep, oversized)
                index += 1


def _wds_sample(
    index: int, key: str, members: dict[str, bytes], shard: str, keep: bool, oversized: dict[str, int]
) -> Sample:
    sample = Sample(index, key, key, shard=shard)
    if not keep:
        return sample
    if oversized:
        ext, size = next(iter(oversized.items()))
        sample.error = _too_large(f"{key}.{ext} in {shard}", size)
        return sample
    image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        sample.error = f"{sample}: no image ({', '.join(WDS_IMAGE_EXTENSIONS)})"
        return sample
    sample.data = members[image_ext]
    if WDS_CAPTION_EXTENSION in members:
        try:
            sample.caption = _caption_text(members[WDS_CAPTION_EXTENSION], str(sample))
        except ValueError as e:
            sample.error = str(e)
    return sample


def _column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], table: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"{table} has no column {wanted!r} (it has {', '.join(names)})")
        return wanted
    return next((name for name in candidates if name in names), None)


def _table_sample(index: int, row: dict[str, Any], image_col: str, caption_col: str | None, table: str) -> Sample:
    path = row.get(image_col)
    base = os.path.dirname(table)
    key = str(row["key"]) if row.get("key") not in (None, "") else f"{index:09d}"
    if not isinstance(path, str) or not path:
        return Sample(index, key, "" if path is None else str(path), error=f"row {index} of {table} has no image path")
    if not _is_url(path) and not os.path.isabs(path):  # relative paths are relative to the table
        path = os.path.join(base, path) if not _is_url(base) else f"{base}/{path}"
    caption = row.get(caption_col) if caption_col else None
    if caption is not None and not isinstance(caption, str):
        caption = None if isinstance(caption, float) and caption != caption else str(caption)  # NaN: none
    return Sample(index, key, path, caption or None)


def read_table(tables: Sequence[str], fmt: str, wanted: Callable[[int], bool], start: int = 0, *,
               image_column: str | None = None, caption_column: str | None = None) -> Iterator[Sample]:  # fmt: skip
    """Rows of Parquet or CSV tables, streamed a batch of rows at a time."""
    index = start
    for table in tables:
        rows = _parquet_rows(table) if fmt == "parquet" else _csv_rows(table)
        names = next(rows)
        image_col = _column(names, image_column, IMAGE_COLUMNS, table)
        if image_col is None:
            raise UsageError(f"{table} has none of the columns {', '.join(IMAGE_COLUMNS)}; pass --image-column")
        caption_col = _column(names, caption_column, CAPTION_COLUMNS, table)
        for row in rows:  # a row is small: made whether wanted or not
            yield _table_sample(index, row, image_col, caption_col, table)
            index += 1


def _parquet_rows(table: str) -> Iterator[Any]:
    _, pq = pyarrow_modules(f"reading {table}")
    with _open(table) as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a non-Parquet file
            raise UsageError(f"{table} is not a Parquet file: {one_line(str(e))}") from e
        yield parquet.schema_arrow.names
        for batch in parquet.iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def _csv_rows(table: str) -> Iterator[Any]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise join the first header.
    with _open(table) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if table.lower().endswith(".tsv") else ",")
        try:
            yield list(reader.fieldnames or [])
            yield from reader
        except UnicodeDecodeError as e:  # text is decoded a block ahead of the rows: the line is approximate
            where = f"after line {reader.line_num}" if reader.line_num else "in its first lines"
            raise UsageError(
                f"{table} is not UTF-8 text ({e.reason} {where}); save it as UTF-8 (the shards finished so far "
                "are kept)"
            ) from e


def read_folders(folders: Sequence[str], wanted: Callable[[int], bool], start: int = 0) -> Iterator[Sample]:
    """Image files under each folder (the library's walk: one sorted order); ``NAME.txt`` beside
    ``NAME.jpg`` is its caption, as clip-retrieval's files reader pairs them."""
    from clipworks.library.scan import walk

    index = start
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"{folder} is not a folder (the files format reads folders of images)")
        for found in walk(folder):
            key = os.path.splitext(os.path.relpath(found.path, folder))[0]
            sample = Sample(index, key, found.path)
            caption_file = os.path.splitext(found.path)[0] + ".txt"
            if wanted(index) and os.path.isfile(caption_file):
                try:
                    sample.caption = _caption_text(Path(caption_file).read_bytes(), caption_file)
                except (OSError, ValueError) as e:
                    sample.error = one_line(str(e))
            yield sample
            index += 1


def read_samples(paths: Sequence[str], fmt: str, wanted: Callable[[int], bool] = lambda i: True, start: int = 0,
                 **columns: str | None) -> Iterator[Sample]:  # fmt: skip
    """Every sample of the inputs in one fixed order, numbered from ``start`` (the number of samples in the
    inputs before these); ``wanted(index)`` False: yield it without reading it."""
    if fmt == "webdataset":
        return read_webdataset(paths, wanted, start)
    if fmt in ("parquet", "csv"):
        return read_table(paths, fmt, wanted, start, **columns)
    return read_folders(paths, wanted, start)


# -- the shard plan: which samples of which input make each output shard ----------------------------------


def shard_of(index: int, shard_size: int) -> int:
    """The output shard of the sample at ``index`` in input order: the one partitioning rule of every engine."""
    return index // shard_size


@dataclass(frozen=True)
class InputSlice:
    """The samples ``[start, stop)`` of the input order that lie in ``path``, whose first sample is ``first``."""

    path: str
    first: int
    start: int
    stop: int


def count_samples(path: str, fmt: str, **columns: str | None) -> int:
    """How many samples one input holds (read as ``read_samples`` reads it, images passed over unread)."""
    return sum(1 for _ in read_samples([path], fmt, lambda i: False, **columns))


def plan_shards(paths: Sequence[str], counts: Sequence[int], shard_size: int) -> dict[int, list[InputSlice]]:
    """Each output shard's slices of the inputs (``counts[i]`` samples in ``paths[i]``), by ``shard_of``."""
    plan: dict[int, list[InputSlice]] = {}
    first = 0
    for path, count in zip(paths, counts, strict=True):
        index = first
        while index < first + count:
            shard = shard_of(index, shard_size)
            stop = min(first + count, (shard + 1) * shard_size)
            plan.setdefault(shard, []).append(InputSlice(path, first, index, stop))
            index = stop
        first += count
    return plan


def read_slice(piece: InputSlice, fmt: str, **columns: str | None) -> Iterator[Sample]:
    """The samples of one slice, numbered in the whole input order (the others passed over unread)."""
    wanted = lambda i: piece.start <= i < piece.stop  # noqa: E731
    for sample in read_samples([piece.path], fmt, wanted, piece.first, **columns):
        if sample.index >= piece.stop:
            return
        if sample.index >= piece.start:
            yield sample


def finished_samples(paths: Sequence[str], counts: Sequence[int], fmt: str, shard_size: int, done: set[int],
                     **columns: str | None) -> dict[int, list[tuple[str, str]]]:  # fmt: skip
    """(key, image_path) of the samples the inputs now put in each shard of ``done``, for
    ``check_finished_shard``: each input holding one of them read once, its images passed over unread."""
    found: dict[int, list[tuple[str, str]]] = {shard: [] for shard in done}
    first = 0
    for path, count in zip(paths, counts, strict=True):
        spans = range(shard_of(first, shard_size), shard_of(first + count - 1, shard_size) + 1) if count else range(0)
        if any(shard in done for shard in spans):
            for sample in read_samples([path], fmt, lambda i: False, first, **columns):
                if (shard := shard_of(sample.index, shard_size)) in found:
                    found[shard].append((sample.key, sample.image_path))
        first += count
    return found


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class DatasetResult:
    embedded: int = 0
    failed: int = 0
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    failed_in_skipped: int = 0  # samples of the skipped shards that could not be embedded when they were written
    seconds: float = 0.0

    def skip(self, folder: Path, shard: int) -> None:
        """``shard`` was finished before: passed over, its failures counted for the summary."""
        self.shards_skipped.append(shard)
        self.failed_in_skipped += shard_failures(folder, shard)

    def summary(self) -> str:
        skipped = f", {len(self.shards_skipped)} finished shards skipped" if self.shards_skipped else ""
        if self.failed_in_skipped:
            skipped += f" ({self.failed_in_skipped} of their samples had failed: --retry-failed embeds those again)"
        failed = f", {self.failed} samples could not be embedded (see errors/)" if self.failed else ""
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        return (f"embedded {self.embedded} images into {len(self.shards_written)} shards{skipped}{failed} "
                f"in {self.seconds:.1f} s: {rate:.1f} images/s")  # fmt: skip

    def nothing_embedded(self) -> str | None:
        """Why the run did nothing, when every sample it read failed (None: some were embedded, or none read)."""
        if self.embedded or not self.failed:
            return None
        return (f"none of the {self.failed} samples read could be embedded (why: errors/); once that is "
                "fixed, the same command with --retry-failed embeds the shards again")  # fmt: skip


# What a resumed job must share with the one that wrote the finished shards, or their rows would differ in
# kind (another model or precision, captions from another column). Older job files lack the last three.
JOB_SETTINGS = ("model", "embed_dim", "input_format", "inputs", "shard_size", "enable_text", "precision",
                "image_column", "caption_column")  # fmt: skip
_LATER_SETTINGS = {"precision", "image_column", "caption_column"}


def _job_record(model: ClipModel, fmt: str, paths: Sequence[str], shard_size: int, text: bool,
                columns: dict[str, str | None], precision: str | None) -> dict[str, Any]:  # fmt: skip
    return {"format": JOB_FORMAT, "model": model.name, "embed_dim": model.embed_dim, "input_format": fmt,
            "inputs": list(paths), "shard_size": shard_size, "enable_text": text,
            "precision": precision or model.precision,
            "image_column": columns.get("image_column"), "caption_column": columns.get("caption_column")}  # fmt: skip


def check_job(folder: Path, record: dict[str, Any]) -> None:
    """Refuse a folder that holds another job's shards; record this job in a new or empty one."""
    from clipworks.atomic import atomic_write_text

    job = folder / JOB_FILE
    if job.is_file():
        try:
            old = json.loads(job.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ClipworksError(f"{job} is not a clipworks dataset job file; use another output folder") from e
        for name in JOB_SETTINGS:
            if name in _LATER_SETTINGS and name not in old:
                continue
            if old.get(name) != record[name]:
                raise UsageError(
                    f"{folder} holds a job with {name} {old.get(name)!r}, not {record[name]!r}: its shards cannot "
                    "be mixed with this one's; use another output folder (or the same settings to resume it)"
                )
        return
    if folder.is_dir() and any((folder / sub).exists() for sub in ("img_emb", "metadata")):
        raise UsageError(f"{folder} holds embeddings from another tool or job (no {JOB_FILE}); use another folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job, json.dumps(record, indent=2) + "\n")


def check_shard_size(shard_size: int) -> None:
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, not {shard_size}")


def open_job(model: ClipModel, paths: Sequence[str], fmt: str, output_folder: str | Path, *, shard_size: int,
             enable_text: bool, columns: dict[str, str | None] | None = None,
             precision: str | None = None) -> Path:  # fmt: skip
    """The checked output folder of a job (its ``job.json`` written or matched), before any engine starts.
    ``precision``: what the embeddings are computed at, when not ``model``'s (Ray's workers load their own)."""
    check_shard_size(shard_size)
    pyarrow_modules("embedding a dataset")
    columns = columns or {}
    if enable_text and fmt in ("parquet", "csv"):
        _check_caption_columns(paths, fmt, columns)
    folder = Path(output_folder).expanduser()
    check_job(folder, _job_record(model, fmt, paths, shard_size, enable_text, columns, precision))
    return folder


def _check_caption_columns(tables: Sequence[str], fmt: str, columns: dict[str, str | None]) -> None:
    """--enable-text on a table with no caption column would make every row an error: refuse it first."""
    for table in tables:
        rows = _parquet_rows(table) if fmt == "parquet" else _csv_rows(table)
        names = next(rows)
        if _column(names, columns.get("caption_column"), CAPTION_COLUMNS, table) is None:
            raise UsageError(
                f"{table} has none of the caption columns {', '.join(CAPTION_COLUMNS)} that --enable-text embeds; "
                "pass --caption-column, or leave out --enable-text"
            )


def shard_done(folder: Path, shard: int, retry_failed: bool) -> bool:
    """Whether a resumed job passes over ``shard``: it is finished and, with ``retry_failed``, none of its
    samples failed (a URL that timed out, a file since fixed: the shard is embedded again, whole)."""
    return shard_finished(folder, shard) and not (retry_failed and shard_failures(folder, shard))


class FinishedShards:
    """Which output shards a resumed job passes over (``shard_done``), each checked to hold the samples the
    inputs now put there: a file added to a folder, or a table edited, shifts later samples to other shards."""

    def __init__(self, folder: Path, result: DatasetResult, retry_failed: bool = False) -> None:
        self.folder, self.result, self.retry_failed = folder, result, retry_failed
        self._finished: dict[int, bool] = {}
        self._keys: dict[int, list[tuple[str, str]]] = {}

    def __contains__(self, shard: int) -> bool:
        if shard not in self._finished:
            self._finished[shard] = shard_done(self.folder, shard, self.retry_failed)
            if self._finished[shard]:
                self.result.skip(self.folder, shard)
        return self._finished[shard]

    def passed_over(self, shard: int, sample: Sample) -> None:
        """A sample of finished ``shard``, in input order (``check`` compares them once the shard is past)."""
        self._keys.setdefault(shard, []).append((sample.key, sample.image_path))

    def check(self, before: int | None = None) -> None:
        """Compare the finished shards below ``before`` (all: None) with what they hold."""
        for shard in sorted(s for s in self._keys if before is None or s < before):
            check_finished_shard(self.folder, shard, self._keys.pop(shard))


def check_no_shards_beyond(folder: Path, last: int) -> None:
    """Refuse to resume when finished shards lie past the inputs' last shard ``last`` (-1: no samples at all):
    the inputs lost samples since those were written, and their rows would stay in the output as if current."""
    beyond = [s for s in finished_shards(folder) if s > last]
    if beyond:
        raise UsageError(
            f"{folder}: finished shard {beyond[0]} lies past the {last + 1} shards the inputs now fill: the inputs "
            "changed since it was written; embed them into another folder"
        )


def check_finished_shard(folder: Path, shard: int, samples: Sequence[tuple[str, str]]) -> None:
    """Refuse to resume when finished ``shard`` does not hold the samples the inputs now put there: the same
    (key, image_path) pairs (a table's rows without a key column are keyed by their place, so the path counts)."""
    now = Counter((parquet_text(k), parquet_text(p)) for k, p in samples)
    held = Counter(shard_samples(folder, shard))
    if now != held:
        differs = next(iter((now - held) or (held - now)))[1]
        raise UsageError(
            f"{folder}: finished shard {shard} holds other samples than the inputs now put there ({differs!r} is "
            "in one and not the other): the inputs changed since it was written; embed them into another folder"
        )


def load_sample(sample: Sample, enable_text: bool) -> Sample:
    """The image's bytes and size (the header only; decoding comes next), or the sample's error."""
    if sample.error is None and enable_text and sample.caption is None:
        sample.error = f"{sample} has no caption (--enable-text embeds every sample's caption)"
    if sample.error is not None:
        sample.data = None
        return sample
    try:
        if sample.data is None:
            with _open(sample.image_path) as fh:
                sample.data = _read_at_most(fh, MAX_SAMPLE_BYTES + 1)
            if len(sample.data) > MAX_SAMPLE_BYTES:
                sample.data = None
                sample.error = _too_large(
                    sample, os.path.getsize(sample.image_path) if not _is_url(sample.image_path) else None
                )
                return sample
        with Image.open(io.BytesIO(sample.data)) as image:
            sample.width, sample.height = image.size
    except MissingExtra:  # no package for the URLs' protocol: every sample would fail, so the job stops
        raise
    except ClipworksError as e:
        sample.error = str(e)
    except UnidentifiedImageError:  # its message names a BytesIO's address, which no two runs share
        sample.error = f"{sample}: not an image format Pillow can read; skip it or convert it to JPEG or PNG"
    except Exception as e:  # any unreadable file or image header is this sample's error
        sample.error = f"{sample}: {one_line(str(e)) or type(e).__name__}"
    if sample.error is not None:
        sample.data = None  # a failure waits for its batch's rows: it must not hold its file's bytes meanwhile
    return sample


def _read_at_most(fh: IO[bytes], limit: int, block: int = 4 * 2**20) -> bytes:
    """Up to ``limit`` bytes, to the end: a stream may return less than asked before its end (HTTP)."""
    parts, held = [], 0
    while held < limit:
        part = fh.read(min(block, limit - held))
        if not part:
            break
        parts.append(part)
        held += len(part)
    return b"".join(parts)


def decode_sample(model: ClipModel, sample: Sample, *, normalised: bool = True) -> np.ndarray:
    """A loaded sample's model pixels (``normalised=False``: the uint8 bytes before normalising, see
    `ClipModel.decode_pixels`); its error (from reading or loading it) as ``BadImage``."""
    if sample.error is not None:
        raise BadImage(sample.error)
    data, sample.data = sample.data, None  # the pixels replace the bytes: memory holds one of them
    return model.preprocess(data) if normalised else model.decode_pixels(data)


class ShardSink:
    """Embedded rows and failures, in input order, into their output shards (``shard_of``) through
    ``ShardWriter``: a shard is committed when the first row of a later one arrives, or by ``close()``.
    Every engine writes through it, so their shards hold the same rows in the same order."""

    def __init__(self, folder: Path, dim: int, shard_size: int, result: DatasetResult, *, text: bool) -> None:
        self.folder, self.dim, self.shard_size, self.text, self.result = folder, dim, shard_size, text, result
        self._writer: ShardWriter | None = None
        self._last = -1

    def add(self, rows: Sequence[dict[str, Any]], image_emb: np.ndarray, text_emb: np.ndarray | None = None) -> None:
        """``rows``: dicts with ``index``, ``error`` (None: embedded) and the metadata columns, in increasing
        ``index``; ``image_emb`` (and ``text_emb``) has one row for each (what a failed row has is unused)."""
        for shard, group in itertools.groupby(range(len(rows)), key=lambda i: shard_of(rows[i]["index"],
                                                                                        self.shard_size)):  # fmt: skip
            writer = self._writer_for(shard)
            embedded = []
            for i in group:
                if rows[i]["index"] <= self._last:
                    raise ClipworksError(f"sample {rows[i]['index']} came twice or out of order; embed again")
                self._last = rows[i]["index"]
                if rows[i].get("error") is None:
                    embedded.append(i)
                else:
                    writer.add_error(rows[i])
                    self.result.failed += 1
            if embedded:
                writer.add([rows[i] for i in embedded], image_emb[embedded],
                           text_emb[embedded] if text_emb is not None else None)  # fmt: skip
                self.result.embedded += len(embedded)

    def _writer_for(self, shard: int) -> ShardWriter:
        if self._writer is not None and self._writer.index != shard:
            self._commit()
        if self._writer is None:
            self._writer = ShardWriter(self.folder, shard, self.dim, text=self.text)
        return self._writer

    def _commit(self) -> None:
        assert self._writer is not None
        self._writer.commit()
        self.result.shards_written.append(self._writer.index)
        self._writer = None

    def close(self) -> None:
        """Commit the last shard."""
        if self._writer is not None:
            self._commit()

    def discard(self) -> None:
        """Interrupted: the unfinished shard leaves no file behind."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None


def embed_dataset(
    model: ClipModel,
    paths: Sequence[str],
    fmt: str,
    output_folder: str | Path,
    *,
    enable_text: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    workers: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> DatasetResult:
    """Embed every sample of ``paths`` into ``output_folder`` in clip-retrieval's layout, one shard at a
    time (memory: one batch in flight plus one shard's metadata rows). Finished shards are kept, except,
    with ``retry_failed``, those with failed samples, which are embedded again."""
    columns = {"image_column": image_column, "caption_column": caption_column}
    folder = open_job(model, paths, fmt, output_folder, shard_size=shard_size, enable_text=enable_text,
                      columns=columns)  # fmt: skip
    start = time.perf_counter()
    result = DatasetResult()
    finished = FinishedShards(folder, result, retry_failed)

    def wanted(index: int) -> bool:
        return shard_of(index, shard_size) not in finished

    def samples() -> Iterator[Sample]:
        shard = -1
        for sample in read_samples(paths, fmt, wanted, **columns):
            shard = shard_of(sample.index, shard_size)
            finished.check(before=shard)
            if shard in finished:
                finished.passed_over(shard, sample)
            else:
                yield sample
        finished.check()
        check_no_shards_beyond(folder, shard)

    sink = ShardSink(folder, model.embed_dim, shard_size, result, text=enable_text)
    try:
        for batch in iter_embeddings(
            model, samples(), batch_size=batch_size, workers=workers, decode=lambda s: decode_sample(model, s),
            key=lambda s: s, on_item=lambda s: load_sample(s, enable_text), on_skip=lambda f: None,
            on_progress=on_progress,
        ):  # fmt: skip
            # The failures (which come before the rows of their batch) and the rows, in input order.
            entries = [(f.extra, f.error) for f in batch.failures] + [(s, None) for s in batch.keys]
            order = sorted(range(len(entries)), key=lambda i: entries[i][0].index)
            image_emb = np.zeros((len(entries), model.embed_dim), SHARD_DTYPE)
            image_emb[len(batch.failures) :] = batch.embeddings
            text_emb = None
            if enable_text:
                text_emb = np.zeros_like(image_emb)
                text_emb[len(batch.failures) :] = _caption_embeddings(model, batch.keys)
            rows = [{**entries[i][0].row(), "index": entries[i][0].index, "error": entries[i][1]} for i in order]
            sink.add(rows, image_emb[order], text_emb[order] if text_emb is not None else None)
        sink.close()
    finally:
        sink.discard()
    result.seconds = time.perf_counter() - start
    return result


def _caption_embeddings(model: ClipModel, samples: Sequence[Sample]) -> np.ndarray:
    captions = [s.caption or "" for s in samples]
    return model.encode_texts(captions).astype(SHARD_DTYPE) if captions else np.zeros((0, model.embed_dim))
