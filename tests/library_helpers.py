"""Helpers shared by the library tests: folders of real photos, their distinct variants, and the EXIF a
camera would have written into them."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

# The test videos: SIDE-pixel squares at FPS frames a second.
FPS = 10
SIDE = 64


class Shot(NamedTuple):
    name: str
    taken: str | None  # EXIF DateTimeOriginal
    offset: str | None  # EXIF OffsetTimeOriginal
    position: tuple[float, float] | None
    make: str | None
    model: str | None
    lens: str | None = None


def rational(value: float) -> IFDRational:
    return IFDRational(round(value * 10_000), 10_000)


def dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    value = abs(value)
    degrees, minutes = int(value), int(value * 60) % 60
    return IFDRational(degrees, 1), IFDRational(minutes, 1), rational(value * 3600 - degrees * 3600 - minutes * 60)


def exif_of(shot: Shot) -> Image.Exif:
    exif = Image.Exif()
    if shot.make:
        exif[0x010F] = shot.make
    if shot.model:
        exif[0x0110] = shot.model
    exif[0x0112] = 1
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if shot.taken:
        sub[0x9003] = shot.taken
    if shot.offset:
        sub[0x9011] = shot.offset
    if shot.lens:
        sub[0xA434] = shot.lens
    if shot.position:
        lat, lon = shot.position
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[1], gps[2] = ("N" if lat >= 0 else "S"), dms(lat)
        gps[3], gps[4] = ("E" if lon >= 0 else "W"), dms(lon)
    return exif


def write_shots(photos: list[Path], root: Path, shots: Sequence[Shot], file_time: float | None = None) -> Path:
    """Each shot as a real photo under ``root`` with its EXIF (the photos cycled, flipped on the second
    round so no two files are the same); a shot without EXIF gets ``file_time`` as its mtime."""
    for i, shot in enumerate(shots):
        target = root / shot.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        if i >= len(photos):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if shot.taken or shot.make:
            image.save(target, exif=exif_of(shot))
        else:
            image.save(target)
            if file_time is not None:
                os.utime(target, (file_time, file_time))
    return root


def copy_photos(photos: list[Path], folder: Path) -> Path:
    """``folder`` (made here) holding a copy of each photo."""
    folder.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, folder / p.name)
    return folder


def make_variants(photos: list[Path], folder: Path, count: int, size: int = 320, fmt: str = "jpg") -> list[Path]:
    """``count`` distinct real-photo files (crops and flips of the sample photos, cycled)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    sources = [Image.open(p).convert("RGB") for p in photos]
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        shift = (i // len(sources)) * 7 % max(1, min(w, h) // 4)
        variant = image.crop((shift, shift, w - shift // 2, h - shift // 3)).resize((size, size * 3 // 4))
        if (i // len(sources)) % 2:
            variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"v{i:03d}.{fmt}"
        variant.save(path)
        out.append(path)
    return out


def stored_vectors(db: Path) -> dict[str, np.ndarray]:
    """Path -> vector of every present file, read straight from SQLite (independent of the library code)."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT f.path, e.vector FROM embeddings e JOIN files f ON f.id = e.file_id WHERE f.deleted_at IS NULL"
        ).fetchall()
    finally:
        conn.close()
    return {p: np.frombuffer(v, dtype="<f4") for p, v in rows}


def file_ids(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT path, id FROM files").fetchall())
    finally:
        conn.close()


def library_of_dim(
    db: Path, paths: Sequence[str], dim: int, seed: int = 0, vectors: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A library holding ``dim``-d unit vectors for ``paths`` (random ones unless ``vectors`` are given),
    imported as the vectors of a ``dim``-d model (``dim=512`` stands for ViT-B-32, whose vectors the robot's
    ClipItems holds; the tiny test bundles make 32-d ones). Returns path -> vector as stored (unit rows are
    stored bit for bit)."""
    from clipworks.library.interchange import import_vectors
    from clipworks.library.store import Store

    if vectors is None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((len(paths), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pkl = db.with_name(db.name + ".pkl")
    pkl.write_bytes(pickle.dumps({"img_path": list(paths), "embedding": list(vectors)}))
    with Store(db) as store:
        import_vectors(store, store.ensure_model(f"random-{dim}", f"random-{dim}-{seed}", dim, None), pkl)
    pkl.unlink()
    return dict(zip(paths, vectors, strict=True))


def scene_frame(colour: tuple[int, int, int], n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame of a scene: a flat colour with a bar moving across it (motion inside the shot) and noise."""
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = colour
    x = (n * 3) % SIDE
    image[:, x : x + 6] = 255 - np.asarray(colour, np.uint8)
    if rng is not None:
        image = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    return image


def make_video(path: Path, scenes: list[tuple[tuple[int, int, int], float]], codec: str = "mpeg4") -> Path:
    """A real encoded video of ``scenes`` (colour, seconds) at `FPS`, written with PyAV (``libvpx`` in a
    ``.webm`` for one Chromium plays without proprietary codecs)."""
    rng = np.random.default_rng(0)
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        n = 0
        for colour, seconds in scenes:
            for _ in range(round(seconds * FPS)):
                frame = av.VideoFrame.from_ndarray(scene_frame(colour, n, rng), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                n += 1
        for packet in stream.encode():
            out.mux(packet)
    return path
