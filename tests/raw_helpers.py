"""Camera RAW files made by the tests: DNGs (TIFF structure, DNG 1.4 tags) holding a real photo as Bayer sensor
data, with or without an embedded JPEG preview, which LibRaw (rawpy) then reads like a camera's.

Written here rather than with pidng because pidng 4.0.9 cannot write a preview IFD pointing to a SubIFD (its IFD-typed
tag mixes str and bytes: TypeError), and a preview is what most real RAWs carry.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SHORT, LONG, BYTE, ASCII, RATIONAL, SRATIONAL = 3, 4, 1, 2, 5, 10
_FORMATS = {SHORT: "H", LONG: "I", BYTE: "B", RATIONAL: "II", SRATIONAL: "ii"}
WHITE = 4095  # 12-bit sensor data


def bayer(photo: Path, size: tuple[int, int] = (192, 128)) -> np.ndarray:
    """The photo, resized to ``size`` (width, height), as RGGB sensor values of 12 bits."""
    rgb = np.asarray(Image.open(photo).convert("RGB").resize(size), np.float32) / 255.0
    mosaic = np.empty(rgb.shape[:2], np.float32)
    mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = rgb[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return np.rint(mosaic**2.2 * WHITE).astype("<u2")  # linear light, as a sensor sees it


class _Tiff:
    """A little-endian TIFF written front to back: data blocks first, each IFD after what it points to."""

    def __init__(self) -> None:
        self.buf = bytearray(b"II*\x00\x00\x00\x00\x00")

    def block(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\x00"
        at = len(self.buf)
        self.buf += data
        return at

    def ifd(self, entries: dict[int, tuple[int, object]]) -> int:
        packed = []
        for tag in sorted(entries):
            kind, value = entries[tag]
            if kind == ASCII:
                data, count = str(value).encode() + b"\x00", len(str(value)) + 1
            else:
                values = value if isinstance(value, list) else [value]
                flat = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]
                data, count = struct.pack("<" + _FORMATS[kind][0] * len(flat), *flat), len(values)
            field = data.ljust(4, b"\x00") if len(data) <= 4 else struct.pack("<I", self.block(data))
            packed.append(struct.pack("<HHI", tag, kind, count) + field)
        return self.block(struct.pack("<H", len(packed)) + b"".join(packed) + b"\x00\x00\x00\x00")

    def finish(self, first_ifd: int) -> bytes:
        struct.pack_into("<I", self.buf, 4, first_ifd)
        return bytes(self.buf)


def write_dng(
    path: Path,
    photo: Path,
    *,
    preview: int | None = None,
    orientation: int = 1,
    make: str = "Clipworks",
    model: str = "Test DNG",
) -> Path:
    """A DNG of ``photo`` at ``path``: its sensor data, plus (``preview``, the longer side in pixels) a JPEG
    preview in IFD0 as cameras and Adobe's converter write it, the sensor data then in a SubIFD."""
    mosaic = bayer(photo)
    height, width = mosaic.shape
    tiff = _Tiff()
    sensor = {
        254: (LONG, 0),
        256: (LONG, width),
        257: (LONG, height),
        258: (SHORT, 16),
        259: (SHORT, 1),
        262: (SHORT, 32803),  # colour filter array
        273: (LONG, tiff.block(mosaic.tobytes())),
        277: (SHORT, 1),
        278: (LONG, height),
        279: (LONG, mosaic.nbytes),
        33421: (SHORT, [2, 2]),
        33422: (BYTE, [0, 1, 1, 2]),  # RGGB
        50714: (LONG, 0),  # black level
        50717: (LONG, WHITE),
    }
    camera = {
        271: (ASCII, make),
        272: (ASCII, model),
        274: (SHORT, orientation),
        50706: (BYTE, [1, 4, 0, 0]),  # DNGVersion
        50707: (BYTE, [1, 1, 0, 0]),
        50708: (ASCII, f"{make} {model}"),
        # An identity camera matrix and neutral white: the sensor's RGB is taken as it is.
        50721: (SRATIONAL, [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]),
        50728: (RATIONAL, [(1, 1), (1, 1), (1, 1)]),
        50778: (SHORT, 21),  # D65
    }
    if preview is None:
        first = tiff.ifd({**sensor, **camera})
    else:
        image = Image.open(photo).convert("RGB")
        scale = preview / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=90)
        sub = tiff.ifd(sensor)
        first = tiff.ifd({
            **camera,
            254: (LONG, 1),  # a reduced-resolution copy
            256: (LONG, image.width),
            257: (LONG, image.height),
            258: (SHORT, [8, 8, 8]),
            259: (SHORT, 7),  # JPEG
            262: (SHORT, 6),  # YCbCr
            273: (LONG, tiff.block(jpeg.getvalue())),
            277: (SHORT, 3),
            278: (LONG, image.height),
            279: (LONG, len(jpeg.getvalue())),
            330: (LONG, sub),  # SubIFDs
        })  # fmt: skip
    path.write_bytes(tiff.finish(first))
    return path
