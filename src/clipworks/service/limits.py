"""Bounded input: request-body size, image pixel count, and Automatic1111-compatible base64 decoding."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Any

import numpy as np
from PIL import Image

from clipworks.errors import BadImage
from clipworks.imaging import PreprocessConfig, decode

ASGIApp = Any

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # a 48 MP phone photo is fine at 0.7x; a 40k x 40k PNG is not


class InvalidImage(BadImage):
    """Bytes that are not an image (or not base64): Automatic1111 answers 500 "Invalid encoded image"."""


class ImageTooLarge(BadImage):
    """An image whose pixel count is over the service's limit (a decompression bomb): 413."""


def decode_base64(encoding: str) -> bytes:
    """Decode what Automatic1111's ``decode_base64_to_image`` accepts: raw base64 or a ``data:image/...`` URL.

    Like Automatic1111 (``base64.b64decode`` without validation) stray characters such as line breaks are
    ignored; padding errors and empty input are refused.
    """
    if encoding.startswith("data:"):
        _, _, encoding = encoding.partition(",")
    try:
        data = base64.b64decode(encoding)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"not valid base64 ({e})") from e
    if not data:
        raise InvalidImage("empty image")
    return data


def check_pixels(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Read only the header: refuse non-images (``InvalidImage``) and over-large ones (``ImageTooLarge``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image is too large to decode safely ({e})") from e
    except Exception as e:
        raise InvalidImage(f"not an image Pillow can read ({type(e).__name__})") from e
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return w, h


def decode_pixels(data: bytes, cfg: PreprocessConfig, max_pixels: int, mode: str = "exact") -> np.ndarray:
    """Check then decode and preprocess one encoded image into model pixels ``(3, S, S)``."""
    check_pixels(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return decode(data, cfg, mode, max_pixels=max_pixels)  # type: ignore[arg-type]
    except BadImage as e:
        raise InvalidImage(str(e)) from e


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length up front or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_413(send, self.max_bytes)
                    return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _too_large(max_bytes: int) -> str:
    return f"request body is over the limit of {max_bytes} bytes"


async def _send_413(send: Any, max_bytes: int) -> None:
    body = json.dumps({"detail": _too_large(max_bytes)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
