"""Embedding files: Sophgo's ``embeddings.pkl``, ``.npy`` with a paths file, and Parquet; and the
primitives every embedding file is made of (video_features' per-video files use them too): one array
saved as ``.npy`` or a portable pickle, a Parquet vector column, atomic writes.

File names are kept exactly, whatever bytes they hold: a newline, or bytes that are not UTF-8 (which
Python carries as ``os.fsdecode``'s surrogates), survive every format. ``OUT.npy`` pairs with
``OUT.paths.json``: one JSON document, so a newline in a name cannot shift the list, that records how many
vectors the array holds and the array file's SHA-256, so an array and a list from different runs are
refused when read instead of being silently misread. Parquet keeps each name's exact bytes beside the text.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.checksum import file_sha256
from clipworks.errors import ClipworksError, UsageError
from clipworks.extras import require

OUTPUT_SUFFIXES = (".pkl", ".npy", ".parquet")
PATHS_FORMAT = "clipworks-paths/1"
# Protocol 4 (Python 3.4+): what Sophgo's writer and Python 3.8's default use, so Sophgo boards on 3.8 read it.
PICKLE_PROTOCOL = 4


class _PortablePickler(pickle.Pickler):
    """Pickles numpy arrays so that numpy 1.x reads them as well as numpy 2.

    numpy 2 pickles an array through ``numpy._core.multiarray._reconstruct``, a module numpy 1.x does not
    have (``ModuleNotFoundError: No module named 'numpy._core'``), and video_features' environment pins
    numpy 1.26. An array is written instead as ``numpy.ndarray(shape, dtype, buffer)``: names both
    versions resolve, the same dtype and values, and a writable array (the buffer is a bytearray).
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(np.ascontiguousarray(obj).tobytes()))
        return NotImplemented


def dump_pickle(value: Any, fh: IO[bytes]) -> None:
    """``pickle.dump`` that numpy 1.26 on Python 3.8 can load (see ``_PortablePickler``)."""
    _PortablePickler(fh, protocol=PICKLE_PROTOCOL).dump(value)


def paths_file_for(npy: Path) -> Path:
    return npy.with_suffix(".paths.json")


def check_output_path(out: str | Path) -> Path:
    """Refuse an unknown suffix or a missing folder before any work starts."""
    out = Path(out).expanduser()
    if out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"output {out} must end in {', '.join(OUTPUT_SUFFIXES)}")
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} for the output {out.name} does not exist; create it first")
    if out.suffix == ".parquet":
        _pyarrow(out)
    return out


def pyarrow_modules(feature: str) -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or the one-line message that ``feature`` needs the parquet extra."""
    require("pyarrow", "parquet", feature)
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _pyarrow(out: Path) -> tuple[Any, Any]:
    return pyarrow_modules(f"writing {out} (or use .pkl/.npy)")


def vector_column(embeddings: np.ndarray) -> Any:
    """(N, D) float32 as one Parquet column of fixed-size lists, D floats a row."""
    pa, _ = pyarrow_modules("a Parquet file")
    embeddings = np.asarray(embeddings, np.float32)
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)


def read_vector_column(table: Any, name: str = "embedding") -> np.ndarray:
    """A vector column back as float32 (N, D), whether written as fixed-size lists or as plain lists."""
    column = table[name]
    size = getattr(column.type, "list_size", None)
    if size is None:  # plain lists, as other tools write them
        return np.asarray(column.to_pylist(), np.float32)
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(len(column), size)


def write_parquet(dest: Path, table: Any) -> Path:
    """Write ``table`` atomically (temporary file + rename)."""
    _, pq = pyarrow_modules(f"writing {dest}")
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return dest


def save_array(dest: Path, value: Any) -> Path:
    """One value as ``dest`` (``.npy``: ``np.save``; ``.pkl``: a pickle numpy 1.x reads), atomically."""
    with atomic_path(dest) as tmp, tmp.open("wb") as fh:
        if dest.suffix == ".npy":
            np.save(fh, value)
        else:
            dump_pickle(value, fh)
    return dest


def load_file(path: Path) -> Any:
    """What ``save_array`` or ``write_parquet`` wrote: the array, the unpickled value, or the table."""
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".pkl":
        with path.open("rb") as fh:
            return pickle.load(fh)
    return pyarrow_modules(f"reading {path}")[1].read_table(path)


def _path_columns(pa: Any, paths: Sequence[str]) -> dict[str, Any]:
    """Parquet strings must be UTF-8: "path" shows a name that is not with U+FFFD, "path_bytes" is exact."""
    return {"path": pa.array([parquet_text(p) for p in paths], pa.string()),
            "path_bytes": pa.array([os.fsencode(p) for p in paths], pa.binary())}  # fmt: skip


class EmbeddingWriter:
    """One embedding file written batch by batch (``add``), then put in place whole by ``close()``.

    ``.npy`` streams its rows to disk and ``.parquet`` writes a row group a batch, so memory holds only the
    paths however many images there are; ``.pkl`` is one pickled dict by its format (Sophgo's), so it holds
    every vector until ``close()``. Nothing reaches ``out`` before ``close()``: an error or an interruption
    (``with`` block left by an exception) removes the temporary files and leaves an old file as it was.
    """

    def __init__(self, out: str | Path, dim: int) -> None:
        self.out = check_output_path(out)
        self.dim = dim
        self.paths: list[str] = []
        self._stack = contextlib.ExitStack()
        self._chunks: list[np.ndarray] = []  # .pkl only
        self._rows: NpyRows | None = None
        self._parquet: Any = None
        if self.out.suffix == ".npy":
            # The paths file is entered first, so it is renamed after the array (see _close_npy).
            self._list_tmp = self._stack.enter_context(atomic_path(paths_file_for(self.out)))
            self._rows = NpyRows(self._stack.enter_context(atomic_path(self.out)), dim)
        elif self.out.suffix == ".parquet":
            pa, pq = _pyarrow(self.out)
            self._schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()),
                                      ("embedding", pa.list_(pa.float32(), dim))])  # fmt: skip
            self._parquet = pq.ParquetWriter(self._stack.enter_context(atomic_path(self.out)), self._schema)

    def add(self, paths: Sequence[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        if len(paths) != len(embeddings):
            raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
        paths = [os.fsdecode(p) for p in paths]
        self.paths.extend(paths)
        if self._rows is not None:
            self._rows.append(embeddings)
        elif self._parquet is not None:
            pa, _ = _pyarrow(self.out)
            columns = [*_path_columns(pa, paths).values(), vector_column(embeddings)]
            self._parquet.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        else:
            self._chunks.append(embeddings)

    def close(self) -> list[Path]:
        """Finish the file(s) and rename them into place; the files written."""
        with self._stack:
            if self._rows is not None:
                return self._close_npy(self._rows)
            if self._parquet is not None:
                self._parquet.close()
                return [self.out]
            # Sophgo's CLIP sample format: a list of paths and a list of float32 (D,) vectors. Pickle keeps
            # surrogates (names that are not UTF-8) as they are.
            vectors = np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim), np.float32)
            return [save_array(self.out, {"img_path": self.paths, "embedding": list(vectors)})]

    def _close_npy(self, rows: NpyRows) -> list[Path]:
        """Both files as one unit: each is complete in its temporary file before either is renamed.

        A full disk or a crash while writing leaves the old pair as it was; the list records the array's
        checksum, so the one instant between the two renames cannot pass for a matching pair either.
        """
        rows.close()
        record = {"format": PATHS_FORMAT, "embeddings": self.out.name, "count": len(self.paths),
                  "sha256": file_sha256(rows.path), "paths": self.paths}  # fmt: skip
        with self._list_tmp.open("w", encoding="ascii") as fh:
            # ensure_ascii: names that are not UTF-8 are written as \udcXX escapes, which json reads back.
            json.dump(record, fh, ensure_ascii=True)
            fh.flush()
            os.fsync(fh.fileno())
        return [self.out, paths_file_for(self.out)]

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if error is None:
            return
        if self._rows is not None:
            self._rows.discard()
        if self._parquet is not None:
            self._parquet.close()
        self._stack.__exit__(kind, error, tb)  # removes the temporary files; the caller's error goes on


def write_embeddings(
    out: str | Path, paths: Sequence[str], embeddings: np.ndarray, columns: Mapping[str, Sequence[Any]] | None = None
) -> list[Path]:
    """Write atomically (temp file + rename), so an interrupted run never leaves a half file. Returns files.
    ``columns`` (one value per path) are added to a Parquet table; the other formats have no place for them."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
    if columns and Path(out).suffix == ".parquet":
        # One table with the extra columns (index export's metadata), written whole: it is all in memory.
        out = check_output_path(out)
        pa, _ = _pyarrow(out)
        table = pa.table({**_path_columns(pa, paths), "embedding": vector_column(embeddings),
                          **{name: pa.array(values) for name, values in columns.items()}})  # fmt: skip
        return [write_parquet(out, table)]
    with EmbeddingWriter(out, embeddings.shape[1] if embeddings.ndim == 2 else 0) as writer:
        writer.add(paths, embeddings)
        return writer.close()


def _read_paths_file(npy: Path, rows: int) -> list[str]:
    listing = paths_file_for(npy)
    if not listing.is_file():
        raise UsageError(f"{listing} (the paths of {npy.name}) is missing")
    try:
        record = json.loads(listing.read_text(encoding="ascii"))
        paths, count, digest = record["paths"], record["count"], record["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ClipworksError(f"{listing} is not a clipworks paths file ({PATHS_FORMAT}); embed again") from e
    if count != rows or len(paths) != rows or digest != file_sha256(npy):
        raise ClipworksError(
            f"{listing} does not belong to {npy.name} (another run wrote one of them): the paths would be "
            "matched to the wrong vectors; embed again"
        )
    return list(paths)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read any of the three formats back as (paths, float32 (N, D))."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if path.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path} must end in {', '.join(OUTPUT_SUFFIXES)}")
    data = load_file(path)
    if path.suffix == ".pkl":
        if not isinstance(data, dict) or not {"img_path", "embedding"} <= data.keys():
            raise UsageError(f"{path} is not an embeddings.pkl (expected keys 'img_path' and 'embedding')")
        return list(data["img_path"]), np.asarray(np.stack(data["embedding"]) if data["embedding"] else [], np.float32)
    if path.suffix == ".npy":
        embeddings = data.astype(np.float32)
        return _read_paths_file(path, len(embeddings)), embeddings
    if "path_bytes" in data.column_names:
        paths = [os.fsdecode(b) for b in data["path_bytes"].to_pylist()]
    else:  # written by other tools, or before names were stored exactly
        paths = data["path"].to_pylist()
    return paths, read_vector_column(data)


# -- streamed arrays and clip-retrieval's shard layout ---------------------------------------------------

# magic + version + length + the header dict, padded: room for any (rows, dim) shape, 64-byte aligned as numpy does.
_NPY_HEADER_BYTES = 128


def _npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    meta = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)}
    text = repr(meta).encode("latin1")
    length = _NPY_HEADER_BYTES - 10
    return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + text.ljust(length - 1) + b"\n"


class NpyRows:
    """A ``(rows, dim)`` ``.npy`` file written a batch of rows at a time, so memory never holds the array.

    The header is written first with room for any row count and rewritten with the true count by
    ``close()``; ``np.load`` (and autofaiss, and clip-retrieval's readers) then read an ordinary array.
    """

    def __init__(self, path: Path, dim: int, dtype: Any = np.float32) -> None:
        self.path = path
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._fh = path.open("wb")
        self._fh.write(_npy_header(0, dim, self.dtype))

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows of shape {rows.shape} do not fit a ({self.dim})-wide array")
        self._fh.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        """Finish the header and flush the file to disk (it is renamed into place next)."""
        with self._fh:
            self._fh.seek(0)
            self._fh.write(_npy_header(self.rows, self.dim, self.dtype))
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def discard(self) -> None:
        self._fh.close()


# clip-retrieval's mapper casts the unit vectors to float16 before its writer saves them; autofaiss reads that.
SHARD_DTYPE = np.float16
SHARD_INDEX_WIDTH = 5  # img_emb_00042.npy: the files sort in input order up to 100000 shards
METADATA_COLUMNS = ("key", "image_path", "caption", "width", "height")
ERROR_COLUMNS = ("key", "image_path", "caption", "error")


def shard_file(folder: Path, kind: str, index: int) -> Path:
    """``FOLDER/img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``, ``metadata/metadata_{i}.parquet``,
    ``errors/errors_{i}.parquet``: clip-retrieval's layout (plus the samples that could not be embedded)."""
    suffix = ".npy" if kind.endswith("_emb") else ".parquet"
    return folder / kind / f"{kind}_{index:0{SHARD_INDEX_WIDTH}d}{suffix}"


def shard_finished(folder: Path, index: int) -> bool:
    """The metadata file is renamed into place last, so its presence means the whole shard is there."""
    return shard_file(folder, "metadata", index).is_file()


def finished_shards(folder: Path) -> list[int]:
    """The indexes of the finished shards in ``folder`` (by their metadata files), ascending."""
    found = (re.fullmatch(r"metadata_(\d+)\.parquet", p.name) for p in (folder / "metadata").glob("metadata_*.parquet"))
    return sorted(int(m.group(1)) for m in found if m)


def shard_failures(folder: Path, index: int) -> int:
    """How many samples of a finished shard could not be embedded (its errors file's rows)."""
    _, pq = pyarrow_modules("reading dataset metadata")
    path = shard_file(folder, "errors", index)
    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0


def shard_samples(folder: Path, index: int) -> list[tuple[str, str]]:
    """(key, image_path) of every sample a finished shard holds: those embedded, then those that failed."""
    _, pq = pyarrow_modules("reading dataset metadata")
    samples: list[tuple[str, str]] = []
    for kind in ("metadata", "errors"):
        path = shard_file(folder, kind, index)
        if path.is_file():
            table = pq.read_table(path, columns=["key", "image_path"])
            samples += [(str(k), str(p)) for k, p in zip(table["key"].to_pylist(), table["image_path"].to_pylist(),
                                                          strict=True)]  # fmt: skip
    return samples


def parquet_text(value: Any) -> Any:
    """A string as Parquet can hold it (UTF-8): a file name that is not UTF-8 (``os.fsdecode``'s lone
    surrogates) shows U+FFFD where its bytes are; anything else is unchanged."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a surrogate that no undecodable byte made (a JSON "\ud800")
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


class ShardWriter:
    """One shard of clip-retrieval's layout, streamed to temporary files and renamed into place together.

    Image (and text) embeddings go to ``NpyRows`` files as batches arrive, so memory holds only the rows'
    metadata. ``commit()`` renames the arrays first and the metadata last: a crash at any point before
    leaves the shard unfinished (``shard_finished`` is False) and a resumed job writes it again.
    """

    def __init__(self, folder: Path, index: int, dim: int, *, text: bool) -> None:
        self.folder, self.index = folder, index
        self.metadata: dict[str, list[Any]] = {name: [] for name in METADATA_COLUMNS}
        self.errors: dict[str, list[Any]] = {name: [] for name in ERROR_COLUMNS}
        self._stack = contextlib.ExitStack()
        kinds = ["metadata", "errors", *(["text_emb"] if text else []), "img_emb"]
        temps = {}
        for kind in kinds:  # entered in this order, renamed in the reverse one: metadata last
            dest = shard_file(folder, kind, index)
            dest.parent.mkdir(parents=True, exist_ok=True)
            temps[kind] = self._stack.enter_context(atomic_path(dest))
        self._metadata_tmp, self._errors_tmp = temps["metadata"], temps["errors"]
        self.images = NpyRows(temps["img_emb"], dim, SHARD_DTYPE)
        self.texts = NpyRows(temps["text_emb"], dim, SHARD_DTYPE) if text else None

    def add(self, rows: Sequence[dict[str, Any]], image_emb: np.ndarray, text_emb: np.ndarray | None = None) -> None:
        """Rows (dicts with ``METADATA_COLUMNS``) and their embeddings, in order."""
        for row in rows:
            for name in METADATA_COLUMNS:
                self.metadata[name].append(parquet_text(row.get(name)))
        self.images.append(image_emb)
        if self.texts is not None:
            self.texts.append(text_emb if text_emb is not None else np.zeros((0, self.images.dim)))

    def add_error(self, row: dict[str, Any]) -> None:
        for name in ERROR_COLUMNS:
            self.errors[name].append(parquet_text(row.get(name)))

    def commit(self) -> None:
        pa, pq = pyarrow_modules("writing dataset metadata")
        types = {"key": pa.string(), "image_path": pa.string(), "caption": pa.string(), "error": pa.string(),
                 "width": pa.int32(), "height": pa.int32()}  # fmt: skip
        # A shard written again (--retry-failed) loses its old metadata first: the files are renamed one by one,
        # and a crash between them must leave the shard unfinished, not new embeddings beside old rows.
        shard_file(self.folder, "metadata", self.index).unlink(missing_ok=True)
        try:
            for tmp, columns in ((self._metadata_tmp, self.metadata), (self._errors_tmp, self.errors)):
                arrays = {name: pa.array(values, types[name]) for name, values in columns.items()}
                pq.write_table(pa.table(arrays), tmp)
            self.images.close()
            if self.texts is not None:
                self.texts.close()
        except BaseException as e:
            self.discard(e)
            raise
        self._stack.close()

    def discard(self, error: BaseException | None = None) -> None:
        """Remove the temporary files: nothing of this shard reaches its final name."""
        self.images.discard()
        if self.texts is not None:
            self.texts.discard()
        error = error or RuntimeError("shard discarded")
        self._stack.__exit__(type(error), error, error.__traceback__)
