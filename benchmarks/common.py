"""Shared set-up for the benchmarks: the machine description, test photos and exported bundles."""

from __future__ import annotations

import subprocess
from pathlib import Path

from clipworks.machine import this_machine

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench"
OPENCV_PHOTOS = Path("/tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data")


def machine() -> str:
    """The CPU (with AVX2/AVX-512/VNNI/AMX), cores and memory: printed with every figure."""
    return this_machine().describe()


def opencv_photos() -> list[Path]:
    """Debian's opencv-doc sample photos (real JPEGs), fetched with apt on first use."""
    if not OPENCV_PHOTOS.is_dir():
        subprocess.run(
            "cd /tmp && apt-get download opencv-doc >/dev/null && dpkg -x opencv-doc_*.deb /tmp/opencv-doc",
            shell=True,
            check=True,
        )
    return sorted(p for p in OPENCV_PHOTOS.glob("*.jpg"))


def photo_set(count: int, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """``count`` JPEGs at a phone-photo-like size, made from the real sample photos (cycled)."""
    from PIL import Image

    folder = WORK / f"photos-{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    sources = opencv_photos()
    out = []
    for i in range(count):
        dest = folder / f"{i:04d}.jpg"
        if not dest.exists():
            Image.open(sources[i % len(sources)]).convert("RGB").resize(size, Image.BICUBIC).save(dest, quality=90)
        out.append(dest)
    return out


def bundle(arch: str = "ViT-B-32", precisions: str = "fp32,int8") -> Path:
    """A full-size architecture with random weights (speed does not depend on the values)."""
    from clipworks.export import export_model

    out = WORK / f"{arch}__random"
    if not (out / "clipworks.json").is_file():
        export_model(arch, out, pretrained="random", precisions=precisions.split(","))
    return out
