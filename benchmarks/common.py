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
    from clipworks.models.bundle import load_bundle

    out = WORK / f"{arch}__random"
    wanted = precisions.split(",")
    if (out / "clipworks.json").is_file():
        have = load_bundle(out).available_precisions("visual")
        wanted = list(dict.fromkeys(have + wanted))  # export again only to add what is missing
        if set(wanted) <= set(have):
            return out
    export_model(arch, out, pretrained="random", precisions=wanted)
    return out


def mixed_photo_set(count: int = 200) -> list[Path]:
    """``count`` files like a phone's camera roll: JPEGs from 0.3 to 12 MP (some EXIF-rotated), PNGs and WebPs,
    made from the real sample photos with a little sensor-like noise (upscaled photos alone compress, and so
    decode, unrealistically well)."""
    import numpy as np
    from PIL import Image

    # (width, height, format, EXIF orientation): cycled; a camera roll is mostly JPEG.
    kinds = [
        (4000, 3000, "JPEG", 1), (1600, 1200, "JPEG", 1), (3000, 2000, "JPEG", 6), (1600, 1200, "JPEG", 1),
        (1024, 768, "JPEG", 1), (2048, 1536, "JPEG", 8), (1600, 1200, "JPEG", 1), (1200, 900, "PNG", 1),
        (1600, 1200, "WEBP", 1), (640, 480, "JPEG", 1),
    ]  # fmt: skip
    folder = WORK / f"mixed-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    sources = opencv_photos()
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        width, height, fmt, orientation = kinds[i % len(kinds)]
        dest = folder / f"{i:04d}.{ {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}[fmt] }"
        if not dest.exists():
            image = Image.open(sources[i % len(sources)]).convert("RGB").resize((width, height), Image.BICUBIC)
            noisy = np.asarray(image, np.int16) + rng.normal(0, 3, (height, width, 3)).astype(np.int16)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            exif = Image.Exif()
            exif[0x0112] = orientation
            options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
            image.save(dest, fmt, exif=exif.tobytes(), **options)
        out.append(dest)
    return out
