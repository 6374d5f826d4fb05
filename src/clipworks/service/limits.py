"""Bounded input: the request-body size limit's default, image pixel count, and Automatic1111-compatible base64
decoding. The body limit itself is enforced by ``clipworks.webguard`` in front of the app."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
from PIL import Image

from clipworks.errors import BadImage
from clipworks.imaging import PreprocessConfig, decode

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # a 48 MP phone photo is fine at 0.7x; a 40k x 40k PNG is not


class InvalidImage(BadImage):
    """Bytes that are not an image (or not base64): Automatic1111 answers 500 "Invalid encoded image"."""


class ImageTooLarge(BadImage):
    """An image whose pixel count is over the service's limit (a decompression bomb): 413."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: it could lead off the allow-list (urllib then raises the 3xx as an HTTPError)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class ImageURLRefused(Exception):
    """An ``http(s)://`` image that may not be fetched (no allow-list, or a host not on it): Automatic1111's
    500 "Requests not allowed", which it answers when its ``api_enable_requests`` option is off."""


def fetch_image_url(url: str, allowed_hosts: tuple[str, ...], max_bytes: int, timeout: float = 30.0) -> bytes:
    """The bytes at ``url``, an image Automatic1111 clients may send instead of base64.

    Automatic1111 fetches any such URL by default; a server that fetches what a request names can be made to
    reach the hosts around it, so clipworks fetches only from ``allowed_hosts`` (``*``: any host), follows
    no redirect (it could lead off the list), and reads at most ``max_bytes``.
    """
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if not allowed_hosts or not ("*" in allowed_hosts or host in {h.lower() for h in allowed_hosts}):
        raise ImageURLRefused(f"fetching images from {host or url!r} is not allowed (see --image-url-host)")

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InvalidImage(f"cannot fetch {url!r} ({e})") from e
    if len(data) > max_bytes:
        raise InvalidImage(f"{url!r} is larger than {max_bytes} bytes")
    return data


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
