"""Feature files as video_features writes them, plus one Parquet file per video for large datasets.

``save_numpy`` / ``save_pickle`` write ``<output>/clip/<model>/<stem>_<key>.npy|.pkl`` for the keys
``clip``, ``fps`` and ``timestamps_ms``; ``save_parquet`` writes ``<stem>.parquet`` with one row per frame
(video, timestamp_ms, embedding) and the fps in the file's metadata, so a folder of them reads as one table.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.extras import require
from clipworks.outputs import dump_pickle
from clipworks.video.features import FEATURE_KEY, VideoFeatures

OUTPUT_KEYS = (FEATURE_KEY, "fps", "timestamps_ms")
SAVE_ACTIONS = {"save_numpy": ".npy", "save_pickle": ".pkl", "save_parquet": ".parquet"}
ACTIONS = ("print", *SAVE_ACTIONS)


def output_dir(output_path: str | Path, model_name: str) -> Path:
    """video_features' layout: ``<output_path>/clip/<model name with '/' replaced by '_'>``."""
    return Path(output_path).expanduser() / FEATURE_KEY / model_name.replace("/", "_")


def feature_files(out_dir: Path, video: str | Path, action: str) -> list[Path]:
    stem = Path(video).stem
    if action == "save_parquet":
        return [out_dir / f"{stem}.parquet"]
    ext = SAVE_ACTIONS[action]
    return [out_dir / f"{stem}_{key}{ext}" for key in OUTPUT_KEYS]


def already_extracted(out_dir: Path, video: str | Path, action: str) -> bool:
    """True when every output file exists and loads (as video_features checks before skipping)."""
    if action not in SAVE_ACTIONS:
        return False
    files = feature_files(out_dir, video, action)
    if not all(f.is_file() for f in files):
        return False
    try:
        for f in files:
            _load(f)
    except Exception:
        return False  # a damaged file is extracted again, not trusted
    return True


def _load(path: Path) -> Any:
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".pkl":
        with path.open("rb") as fh:
            return pickle.load(fh)
    return _pyarrow()[1].read_table(path)


def _pyarrow() -> tuple[Any, Any]:
    require("pyarrow", "parquet", "--format parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def save_features(features: VideoFeatures, out_dir: Path, action: str, *, warn: IO[str] | None = None) -> list[Path]:
    """Write one video's files atomically (temp file + rename); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if action == "save_parquet":
        return [_save_parquet(features, feature_files(out_dir, features.path, action)[0])]
    written = []
    for (key, value), dest in zip(
        features.as_dict().items(), feature_files(out_dir, features.path, action), strict=True
    ):
        if key != "fps" and len(value) == 0:
            print(f"Warning: the value is empty for {key} @ {dest}", file=warn or sys.stdout)
        with atomic_path(dest) as tmp, tmp.open("wb") as fh:
            if action == "save_numpy":
                np.save(fh, value)
            else:
                dump_pickle(value, fh)
        written.append(dest)
    return written


def _save_parquet(features: VideoFeatures, dest: Path) -> Path:
    pa, pq = _pyarrow()
    emb = np.asarray(features.embeddings, np.float32)
    dim = emb.shape[1] if emb.ndim == 2 else 0
    table = pa.table(
        {
            "video": pa.array([str(features.path)] * len(emb), pa.string()),
            "timestamp_ms": pa.array(np.asarray(features.timestamps_ms, np.float64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
        }
    ).replace_schema_metadata({"fps": repr(float(features.fps)), "feature": FEATURE_KEY})
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return dest


def print_features(features: VideoFeatures, file: IO[str] | None = None) -> None:
    """video_features' ``print``: each key, its value, and its max, mean and min."""
    out = file or sys.stdout
    for key, value in features.as_dict().items():
        print(key, file=out)
        print(value, file=out)
        if value.size:  # video_features raises on an empty array here; a video without frames prints no stats
            print(f"max: {value.max():.8f}; mean: {value.mean():.8f}; min: {value.min():.8f}", file=out)
        print(file=out)


def load_features(out_dir: Path, video: str | Path) -> VideoFeatures | None:
    """Saved features of ``video`` in any of the three formats, or None when there are none."""
    for action in ("save_numpy", "save_pickle", "save_parquet"):
        files = feature_files(out_dir, video, action)
        if not all(f.is_file() for f in files):
            continue
        if action == "save_parquet":
            table = _load(files[0])
            emb = np.asarray(table["embedding"].to_pylist(), np.float32).reshape(table.num_rows, -1)
            fps = float((table.schema.metadata or {}).get(b"fps", b"0"))
            stamps = np.asarray(table["timestamp_ms"].to_numpy(), np.float64)
            return VideoFeatures(Path(video), emb, stamps, fps)
        clip, fps, stamps = (_load(f) for f in files)
        return VideoFeatures(Path(video), np.asarray(clip, np.float32), np.asarray(stamps, np.float64), float(fps))
    return None
