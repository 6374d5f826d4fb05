"""Feature files as video_features writes them, plus one Parquet file per video for large datasets.

``save_numpy`` / ``save_pickle`` write ``<output>/clip/<model>/<stem>_<key>.npy|.pkl`` for the keys
``clip``, ``fps`` and ``timestamps_ms``; ``save_parquet`` writes ``<stem>.parquet`` with one row per frame
(video, timestamp_ms, embedding) and the fps in the file's metadata, so a folder of them reads as one table.
The files are made with ``clipworks.outputs``' primitives, the one home of the embedding-file formats.

Features of a model whose graph L2-normalises (an Immich-layout bundle) are unit vectors where
video_features saves raw ``encode_image`` output. The ``.npy``/``.pkl`` files stay exactly as video_features
writes them; ``<stem>_clip.json`` beside them says so (video_features' readers never open it), and a
Parquet file says it in its metadata (``unit_vectors``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.outputs import load_file, pyarrow_modules, read_vector_column, save_array, vector_column, write_parquet
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


def unit_vectors_file(out_dir: Path, video: str | Path) -> Path:
    """The note beside ``<stem>_clip.npy|.pkl`` that its rows are unit vectors (only when they are)."""
    return out_dir / f"{Path(video).stem}_{FEATURE_KEY}.json"


def already_extracted(out_dir: Path, video: str | Path, action: str) -> bool:
    """True when every output file exists and loads (as video_features checks before skipping)."""
    if action not in SAVE_ACTIONS:
        return False
    files = feature_files(out_dir, video, action)
    if not all(f.is_file() for f in files):
        return False
    try:
        for f in files:
            load_file(f)
    except Exception:
        return False  # a damaged file is extracted again, not trusted
    return True


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
        written.append(save_array(dest, value))
    note = unit_vectors_file(out_dir, features.path)
    if features.unit_vectors:
        why = "the model's graph L2-normalises its output; video_features saves raw encode_image output"
        record = {"unit_vectors": True, "files": [p.name for p in written], "why": why}
        with atomic_path(note) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        written.append(note)
    else:
        note.unlink(missing_ok=True)  # raw features now: a note left by an earlier run would be wrong
    return written


def _save_parquet(features: VideoFeatures, dest: Path) -> Path:
    pa, _ = pyarrow_modules("--format parquet")
    emb = np.asarray(features.embeddings, np.float32)
    table = pa.table(
        {
            "video": pa.array([str(features.path)] * len(emb), pa.string()),
            "timestamp_ms": pa.array(np.asarray(features.timestamps_ms, np.float64)),
            "embedding": vector_column(emb),
        }
    ).replace_schema_metadata(
        {"fps": repr(float(features.fps)), "feature": FEATURE_KEY, "unit_vectors": json.dumps(features.unit_vectors)}
    )
    return write_parquet(dest, table)


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
            table = load_file(files[0])
            metadata = table.schema.metadata or {}
            fps = float(metadata.get(b"fps", b"0"))
            stamps = np.asarray(table["timestamp_ms"].to_numpy(), np.float64)
            unit = metadata.get(b"unit_vectors") == b"true"
            return VideoFeatures(Path(video), read_vector_column(table), stamps, fps, unit_vectors=unit)
        clip, fps, stamps = (load_file(f) for f in files)
        unit = unit_vectors_file(out_dir, video).is_file()
        return VideoFeatures(Path(video), np.asarray(clip, np.float32), np.asarray(stamps, np.float64), float(fps),
                             unit_vectors=unit)  # fmt: skip
    return None
