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

import json
import os
import pickle
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


def _write_npy(out: Path, paths: Sequence[str], embeddings: np.ndarray) -> list[Path]:
    """Both files as one unit: each is written in full to a temporary file before either is renamed.

    A full disk or a crash while writing leaves the old pair as it was; the list records the array's
    checksum, so the one instant between the two renames cannot pass for a matching pair either.
    """
    listing = paths_file_for(out)
    with atomic_path(out) as npy_tmp, atomic_path(listing) as list_tmp:
        with npy_tmp.open("wb") as fh:
            np.save(fh, embeddings)
            fh.flush()
            os.fsync(fh.fileno())
        record = {"format": PATHS_FORMAT, "embeddings": out.name, "count": len(paths),
                  "sha256": file_sha256(npy_tmp), "paths": list(paths)}  # fmt: skip
        with list_tmp.open("w", encoding="ascii") as fh:
            # ensure_ascii: names that are not UTF-8 are written as \udcXX escapes, which json reads back.
            json.dump(record, fh, ensure_ascii=True)
            fh.flush()
            os.fsync(fh.fileno())
        # atomic_path renames the inner (list) file first, then the array.
    return [out, listing]


def write_embeddings(
    out: str | Path, paths: Sequence[str], embeddings: np.ndarray, columns: Mapping[str, Sequence[Any]] | None = None
) -> list[Path]:
    """Write atomically (temp file + rename), so an interrupted run never leaves a half file. Returns files.
    ``columns`` (one value per path) are added to a Parquet table; the other formats have no place for them."""
    out = check_output_path(out)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
    paths = [os.fsdecode(p) for p in paths]
    if out.suffix == ".npy":
        return _write_npy(out, paths, embeddings)
    if out.suffix == ".pkl":
        # Sophgo's CLIP sample format: a list of paths and a list of float32 (D,) vectors. Pickle keeps
        # surrogates (names that are not UTF-8) as they are.
        return [save_array(out, {"img_path": paths, "embedding": list(embeddings)})]
    pa, _ = _pyarrow(out)
    raw = [os.fsencode(p) for p in paths]
    # Parquet strings must be UTF-8: "path" shows a name that is not with U+FFFD, "path_bytes" is exact.
    text = pa.array([b.decode("utf-8", "replace") for b in raw], pa.string())
    table = pa.table({"path": text, "path_bytes": pa.array(raw, pa.binary()), "embedding": vector_column(embeddings),
                      **{name: pa.array(values) for name, values in (columns or {}).items()}})  # fmt: skip
    return [write_parquet(out, table)]


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
