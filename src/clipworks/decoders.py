"""The decoders behind decode mode "fast": the quickest installed library per format, Pillow otherwise.

Measured on one core (benchmarks/bench_decode.py, RESULTS.md): libjpeg-turbo's DCT scaling through
simplejpeg decodes a 12 MP JPEG straight to 1/8 size, a little faster than Pillow's own ``draft()`` (the same
scaling inside Pillow's chunked decoder, to the same pixels: simplejpeg is asked for draft's scale) and than
OpenCV's ``IMREAD_REDUCED_*``. PNG and WebP stay with Pillow: OpenCV decodes both faster on its own, but a
file must first be opened by Pillow (format, size and pixel limit from the header) and Pillow's WebP open
already decodes the picture, so handing over to OpenCV measured slower for both. Without simplejpeg a JPEG
is drafted by Pillow. A new decoder is one ``FastDecoder`` subclass in ``FAST_DECODERS``.

A decoder only ever sees a file Pillow has already opened (its header read, the pixel limit checked) and
whose colour mode it converts exactly as ``load_image`` would (``modes``); anything else, and any file a
decoder fails on, goes to Pillow, so errors and their messages are Pillow's. EXIF orientation is applied
from the metadata Pillow read with the header (a PNG's eXIf chunk must precede its pixels; reading one after
them would mean decoding the file twice).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np
from PIL import Image

__all__ = ["FAST_DECODERS", "FastDecoder", "decode_fast", "describe_fast"]

# ImageOps.exif_transpose's table: EXIF orientation -> the transpose that makes the picture upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class FastDecoder:
    """One optional library decoding some formats to 8-bit RGB. Subclass, set the class variables, implement
    :meth:`decode`, add an instance to ``FAST_DECODERS``."""

    name: ClassVar[str]  # what ``index status`` and ``bench`` print
    module: ClassVar[str]  # the import that must succeed
    # Pillow's format name -> the header modes this decoder turns into exactly what Pillow's convert('RGB') gives.
    modes: ClassVar[dict[str, frozenset[str]]]

    def available(self) -> bool:
        return _module(self.module) is not None

    def accepts(self, im: Image.Image) -> bool:
        return im.mode in self.modes.get(im.format or "", frozenset()) and getattr(im, "n_frames", 1) == 1

    def decode(self, data: bytes, min_side: int, size: tuple[int, int]) -> np.ndarray | None:
        """HxWx3 uint8 RGB as stored (orientation not applied), at least ``min_side`` on both sides where the
        format can decode reduced; ``size`` is the stored (width, height) from the header. None when this
        decoder cannot read the data."""
        raise NotImplementedError


class SimpleJpegDecoder(FastDecoder):
    name = "simplejpeg"
    module = "simplejpeg"
    modes: ClassVar[dict[str, frozenset[str]]] = {"JPEG": frozenset({"RGB", "L"}), "MPO": frozenset({"RGB", "L"})}

    def decode(self, data: bytes, min_side: int, size: tuple[int, int]) -> np.ndarray | None:
        import simplejpeg

        # Pillow's draft() scale (1/2, 1/4 or 1/8, at most the image over min_side on both axes), so "fast"
        # gives the same pixels whether simplejpeg is installed or not, and a photo too small to scale decodes
        # exactly; libjpeg-turbo's other scales (3/8, 7/8 ...) moved small photos for little gain. Accurate
        # integer DCT and upsampling: fastdct/fastupsample saved little and moved pixels more (RESULTS.md).
        width, height = size
        most = min(width // min_side, height // min_side)
        factor = next((f for f in (8, 4, 2) if f <= most), 1)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // factor), min_width=-(-width // factor))


FAST_DECODERS: list[FastDecoder] = [SimpleJpegDecoder()]


def _decoder_for(im: Image.Image) -> FastDecoder | None:
    return next((d for d in FAST_DECODERS if d.accepts(im) and d.available()), None)


def decode_fast(im: Image.Image, min_side: int) -> Image.Image | None:
    """``im`` (opened, not loaded) decoded by the fastest installed decoder for its format, upright, RGB;
    None when none applies or it failed (the caller then loads ``im`` with Pillow)."""
    decoder = _decoder_for(im)
    fp = getattr(im, "fp", None)
    if decoder is None or fp is None:
        return None
    try:
        fp.seek(0)
        pixels = decoder.decode(fp.read(), min_side, im.size)
    except Exception:
        return None  # Pillow decodes it again and words the error, if there is one
    if pixels is None:
        return None
    rgb = Image.fromarray(pixels)
    method = _TRANSPOSE.get(_orientation(im))
    return rgb.transpose(method) if method is not None else rgb


def _orientation(im: Image.Image) -> int:
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:
        return 1  # a damaged EXIF block should not cost the picture, as in load_image


def describe_fast() -> str:
    """Which decoder "fast" uses here for the formats it speeds up: ``JPEG simplejpeg`` (Pillow for the rest)."""
    formats = {"JPEG": "pillow-draft"}
    for decoder in reversed(FAST_DECODERS):  # the first in the list wins, as in decode_fast
        if decoder.available():
            formats.update({fmt: decoder.name for fmt in decoder.modes if fmt in formats})
    return ", ".join(f"{fmt} {name}" for fmt, name in formats.items())
