"""Embedding files: Sophgo's ``embeddings.pkl``, ``.npy`` with a paths file, and Parquet."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipworks.atomic import atomic_path, atomic_write_text
from clipworks.errors import UsageError

OUTPUT_SUFFIXES = (".pkl", ".npy", ".parquet")


def paths_file_for(npy: Path) -> Path:
    return npy.with_suffix(".paths.txt")


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


def _pyarrow(out: Path):  # type: ignore[no-untyped-def]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError(f"writing {out} needs pyarrow: pip install 'clipworks[parquet]', or use .pkl/.npy") from e
    return pa, pq


def write_embeddings(out: str | Path, paths: Sequence[str], embeddings: np.ndarray) -> list[Path]:
    """Write atomically (temp file + rename), so an interrupted run never leaves a half file. Returns files."""
    out = check_output_path(out)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
    written = [out]
    if out.suffix == ".npy":  # the paths first: the array's appearance marks a complete pair
        listing = paths_file_for(out)
        atomic_write_text(listing, "".join(f"{p}\n" for p in paths))
        written.append(listing)
    with atomic_path(out) as tmp:
        if out.suffix == ".pkl":
            # Sophgo's CLIP sample format: a list of paths and a list of float32 (D,) vectors.
            data = {"img_path": [str(p) for p in paths], "embedding": list(embeddings)}
            with tmp.open("wb") as fh:
                pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)
        elif out.suffix == ".npy":
            with tmp.open("wb") as fh:
                np.save(fh, embeddings)
        else:
            pa, pq = _pyarrow(out)
            dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)
            pq.write_table(pa.table({"path": pa.array([str(p) for p in paths]), "embedding": vectors}), tmp)
    return written


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read any of the three formats back as (paths, float32 (N, D))."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if path.suffix == ".pkl":
        with path.open("rb") as fh:
            data = pickle.load(fh)
        if not isinstance(data, dict) or not {"img_path", "embedding"} <= data.keys():
            raise UsageError(f"{path} is not an embeddings.pkl (expected keys 'img_path' and 'embedding')")
        return list(data["img_path"]), np.asarray(np.stack(data["embedding"]) if data["embedding"] else [], np.float32)
    if path.suffix == ".npy":
        listing = paths_file_for(path)
        if not listing.is_file():
            raise UsageError(f"{listing} (the paths of {path.name}) is missing")
        return listing.read_text(encoding="utf-8").splitlines(), np.load(path).astype(np.float32)
    if path.suffix == ".parquet":
        _, pq = _pyarrow(path)
        table = pq.read_table(path)
        return table["path"].to_pylist(), np.asarray(table["embedding"].to_pylist(), np.float32)
    raise UsageError(f"{path} must end in {', '.join(OUTPUT_SUFFIXES)}")
