"""Decode images and turn them into model input: decode, resize, crop, normalise.

`preprocess` reproduces open_clip's eval transform (`open_clip.image_transform(..., is_train=False)`) with
Pillow and numpy only, so the runtime never needs torch. It resizes with the same Pillow call torchvision
makes for PIL input and normalises through a per-channel lookup table computed with the same float32
operations as `ToTensor` + `Normalize`, so its output matches open_clip's bit for bit.

`load_image` is the tolerant front door: paths, bytes, PIL images and numpy arrays in, an RGB image out, with
EXIF orientation applied and every unreadable input turned into one `BadImage` naming it.

A config's `profile` says whose pixels to reproduce. "open_clip" (the default) is the above. "immich" is what
Immich's machine-learning service feeds the same graph (`immich_ml.models.transforms` and
`OpenClipVisualEncoder.transform`): no EXIF rotation, Pillow's plain `convert('RGB')`, a bicubic resize of the
shorter side with the longer side truncated (`int`), a crop whose offset is truncated too (open_clip rounds half
to even: 1 pixel apart on 1024x683 or 1000x667), and float32 `x / 255 * (1 / std) - mean / std`. Vectors that go
into an Immich database must come from Immich's pixels, or they drift from the ones Immich computed itself.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from clipworks.decoders import decode_fast, describe_fast
from clipworks.errors import BadBundle, BadImage, UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "RAW_EXTENSIONS",
    "ImageSource",
    "PreprocessConfig",
    "crop_pixels",
    "decode",
    "decode_pixels",
    "describe_decode",
    "is_image_path",
    "is_raw_path",
    "load_image",
    "load_image_immich",
    "load_thumbnail",
    "preprocess",
    "preprocess_immich",
    "to_model_pixels",
]

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
Interpolation = Literal["bicubic", "bilinear"]
ResizeMode = Literal["shortest", "longest", "squash"]
PixelProfile = Literal["open_clip", "immich"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif", ".gif"})
# Camera RAW files, read through rawpy (LibRaw) when the `raw` extra is installed (`raw_supported`).
RAW_EXTENSIONS: frozenset[str] = frozenset({".arw", ".cr2", ".cr3", ".nef", ".orf", ".raf", ".rw2", ".dng"})
# A RAW's embedded preview stands for the file when its shorter side has at least this many pixels (or the
# `draft_size` asked for): enough for every CLIP input size in the registry. Camera previews are mostly
# full size; a smaller one is passed over for a demosaic of the sensor data.
RAW_PREVIEW_MIN_SIDE = 512

# open_clip's defaults (open_clip.constants), used for keys a preprocess_cfg.json leaves out.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_RESIZE_MODES = ("shortest", "longest", "squash")
# Whose preprocessing to reproduce (module docstring); clipworks.profiles names the same profiles.
PIXEL_PROFILES: tuple[PixelProfile, ...] = ("open_clip", "immich")
_INTERPOLATIONS = ("bicubic", "bilinear", "random")
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# Greyscale modes with more than 8 bits; Pillow's own convert() clips them at 255 instead of scaling.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the path's extension is one of IMAGE_EXTENSIONS (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_raw_path(path: str | os.PathLike[str]) -> bool:
    """True when the path's extension is one of RAW_EXTENSIONS (case-insensitive)."""
    return Path(path).suffix.lower() in RAW_EXTENSIONS


@functools.cache
def raw_supported() -> bool:
    """Whether rawpy is installed, so that RAW files decode (``pip install clipworks[raw]``)."""
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its pixels: the contents of a bundle's `visual/preprocess_cfg.json`."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"
    fill_color: int = 0
    # Not part of preprocess_cfg.json: chosen where the model is loaded (`ClipModel(..., profile=...)`).
    profile: PixelProfile = "open_clip"

    def __post_init__(self) -> None:
        h, w = self.size
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            _bad_cfg(f"size {self.size!r} must be two positive integers (height, width)")
        if len(self.mean) != 3 or len(self.std) != 3:
            _bad_cfg(f"mean {self.mean!r} and std {self.std!r} need one value per RGB channel")
        if any(s == 0 for s in self.std):
            _bad_cfg(f"std {self.std!r} contains a zero")
        if self.interpolation not in _PIL_FILTERS:
            _bad_cfg(f"interpolation {self.interpolation!r} is not one of {', '.join(_PIL_FILTERS)}")
        if self.resize_mode not in _RESIZE_MODES:
            _bad_cfg(f"resize_mode {self.resize_mode!r} is not one of {', '.join(_RESIZE_MODES)}")
        if not (isinstance(self.fill_color, int) and 0 <= self.fill_color <= 255):
            _bad_cfg(f"fill_color {self.fill_color!r} must be an integer from 0 to 255")
        if self.profile not in PIXEL_PROFILES:
            raise UsageError(f"preprocessing profile {self.profile!r} is not one of {', '.join(PIXEL_PROFILES)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Read `open_clip.get_model_preprocess_cfg(model)`'s dict; missing keys take open_clip's defaults."""
        mode = d.get("mode", "RGB")
        if mode != "RGB":
            _bad_cfg(f"mode {mode!r} is not supported; open_clip models take 'RGB'")
        size = d.get("size") or 224
        if isinstance(size, int):
            size = (size, size)
        elif isinstance(size, list | tuple) and len(size) == 1:
            size = (size[0], size[0])
        if not (isinstance(size, list | tuple) and len(size) == 2):
            _bad_cfg(f"size {size!r} must be an integer or [height, width]")
        interpolation = d.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATIONS:
            _bad_cfg(f"interpolation {interpolation!r} is not one of {', '.join(_INTERPOLATIONS)}")
        return cls(
            size=(size[0], size[1]),
            mean=_per_channel(d.get("mean") or OPENAI_MEAN, "mean"),
            std=_per_channel(d.get("std") or OPENAI_STD, "std"),
            # open_clip picks a random filter only when training; at inference "random" means bicubic.
            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
            resize_mode=d.get("resize_mode") or "shortest",
            fill_color=d.get("fill_color") or 0,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape `from_dict` reads back."""
        return {
            "size": list(self.size),
            "mode": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


def _bad_cfg(problem: str) -> NoReturn:
    raise BadBundle(f"preprocess config: {problem}; fix visual/preprocess_cfg.json or re-export the model")


def _per_channel(value: Any, key: str) -> tuple[float, float, float]:
    # open_clip repeats a scalar mean/std over the three channels.
    if isinstance(value, int | float):
        return (float(value),) * 3
    if not (isinstance(value, list | tuple) and len(value) == 3):
        _bad_cfg(f"{key} {value!r} needs one value per RGB channel")
    return (float(value[0]), float(value[1]), float(value[2]))


def load_image(source: ImageSource, *, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image, upright per its EXIF orientation.

    `source` is a path, encoded bytes, a PIL image or a numpy array (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA).
    Animated files give their first frame. Alpha is dropped, not composited, exactly as open_clip's
    `convert('RGB')` does, so embeddings match open_clip's; 16-bit and float greyscale is scaled to 8 bits
    rather than clipped at 255 (integers: 0-255 kept, up to 65535 divided by 257, else stretched; floats:
    0-1 times 255, 0-255 kept, else stretched).

    `draft_size` asks for the fastest decode (`clipworks.decoders`): a JPEG decodes at a reduced scale
    (libjpeg-turbo's DCT scaling, through simplejpeg when installed, else Pillow's `draft`), never below
    `draft_size` on its shorter side: much faster for large photos, slightly different pixels.
    `max_pixels` (default `PIL.Image.MAX_IMAGE_PIXELS`) rejects larger files before decoding them; Pillow
    refuses anything over twice its own `MAX_IMAGE_PIXELS` regardless. A PIL image that is already RGB and
    upright is returned as is, not copied.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        return _to_rgb(_upright(source, in_place=False), name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise BadImage(f"{name}: no data (0 bytes); pass the encoded file's contents")
        return _open(io.BytesIO(source), name, draft_size, limit, path=None)
    if isinstance(source, str | os.PathLike):
        return _open(name, name, draft_size, limit, path=name)
    raise BadImage(f"{name}: unsupported image source; pass a path, bytes, a PIL image or a numpy array")


def load_thumbnail(
    source: ImageSource, size: int, *, max_pixels: int | None = None, alpha: bool = False
) -> Image.Image:
    """`source` decoded as `load_image` does (same refusals, same `max_pixels` limit checked before decoding)
    and shrunk to fit in `size` x `size` pixels, aspect ratio kept, never enlarged: a new RGB image.

    JPEGs decode at reduced scale (libjpeg's DCT scaling) and other formats are reduced by a whole factor
    before the final LANCZOS filter, so the cost is one decode at most and the output is for people, not
    for models (use `decode` for those). With `alpha`, a file (path or bytes) with transparency comes back
    RGBA instead: dropping alpha, as models see it, shows people whatever colour the clear pixels hold.
    """
    if not (isinstance(size, int) and size >= 1):
        raise UsageError(f"thumbnail size {size!r} must be a positive integer")
    if alpha and isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        name = _describe(source)
        limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        fp = name if isinstance(source, str | os.PathLike) else io.BytesIO(source)
        image = _open(fp, name, size, limit, path=name if isinstance(fp, str) else None, finish=_for_display)
    else:
        image = load_image(source, draft_size=size, max_pixels=max_pixels)
    if image is source:
        image = image.copy()  # Image.thumbnail works in place; the caller's image stays as it was
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def _describe(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def _open(
    fp: str | io.BytesIO,
    name: str,
    draft_size: int | None,
    limit: int | None,
    path: str | None,
    finish: Callable[[Image.Image, str], Image.Image] | None = None,
) -> Image.Image:
    """Decode one file under the pixel limit; `finish` turns the loaded image into RGB (default: upright, then
    `_to_rgb`). A RAW path goes to `_open_raw`, and so does anything else Pillow cannot identify that LibRaw
    can (an upload's bytes, the server's ``/proc/self/fd/N`` of an indexed RAW)."""
    if path is not None and is_raw_path(path):
        return _open_raw(fp, name, draft_size, limit)
    try:
        with Image.open(fp) as im:
            _check_pixels(name, *im.size, limit)
            if draft_size and finish is None and (fast := decode_fast(im, draft_size)) is not None:
                return fast
            # MpoImageFile (camera JPEGs with a preview) subclasses JpegImageFile and drafts the same way.
            if draft_size and isinstance(im, JpegImagePlugin.JpegImageFile):
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            if finish is None:
                _upright(im, in_place=True)
                rgb = _to_rgb(im, name)
            else:
                rgb = finish(im, name)
            # An animated file's object keeps the whole file's decoder state alive; hand back plain pixels.
            if rgb is im and getattr(im, "n_frames", 1) > 1:
                rgb = im.copy()
            return rgb
    except BadImage:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise _unopenable(name, e) from e
    except Image.DecompressionBombError as e:
        raise BadImage(f"{name}: {_one_line(e)}; raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from e
    except UnidentifiedImageError as e:
        if path is not None and _is_empty(path):
            raise BadImage(f"{name}: file is empty (0 bytes); re-copy or skip it") from e
        if raw_supported():
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
            with contextlib.suppress(BadImage):  # no RAW either: Pillow's word below
                return _open_raw(fp, name, draft_size, limit)
        raise BadImage(f"{name}: not an image format Pillow can read; skip it or convert it to JPEG or PNG") from e
    except Exception as e:
        # Pillow's plugins fail on malformed files with many exception types (OSError for truncation,
        # SyntaxError, struct.error, IndexError, ZeroDivisionError ...); all mean "this file is unusable".
        raise BadImage(f"{name}: cannot decode image ({_one_line(e)}); the file may be truncated or corrupt") from e


def _unopenable(name: str, e: OSError) -> BadImage:
    """Why a file could not be opened at all, whatever would have decoded it."""
    if isinstance(e, FileNotFoundError):
        return BadImage(f"{name}: no such file; check the path")
    if isinstance(e, IsADirectoryError):
        return BadImage(f"{name}: is a directory, not an image file")
    return BadImage(f"{name}: permission denied; check the file's permissions")


def _check_pixels(name: str, w: int, h: int, limit: int | None) -> None:
    if limit is not None and w * h > limit:
        raise BadImage(
            f"{name}: {w}x{h} is {w * h} pixels, over the limit of {limit}"
            " (a decompression bomb?); raise max_pixels if you trust the file"
        )


# -- camera RAW ---------------------------------------------------------------------------------------------

# LibRaw's `sizes.flip` -> the transpose that makes the picture upright (as its own demosaic output is).
_RAW_FLIPS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def _open_raw(fp: str | io.BytesIO, name: str, draft_size: int | None, limit: int | None) -> Image.Image:
    """A camera RAW as an upright RGB image: its embedded preview when one is large enough (as rclip does:
    decoding a JPEG costs a fraction of a demosaic), else LibRaw's half-size demosaic with the camera's white
    balance. The sensor size is checked against the pixel limit before any pixels are read."""
    if not raw_supported():
        raise BadImage(f"{name}: a camera RAW file; install the raw extra (pip install 'clipworks[raw]') to read it")
    try:
        with _raw_reader(fp) as raw:
            sizes = raw.sizes
            _check_pixels(name, sizes.width, sizes.height, limit)
            preview = _raw_preview(raw, name, draft_size, limit)
            if preview is not None:
                return preview
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
        return Image.fromarray(rgb)
    except BadImage:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise _unopenable(name, e) from e
    except Exception as e:  # LibRawError and its kin, MemoryError from a huge allocation
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else _one_line(e)
        raise BadImage(
            f"{name}: cannot decode RAW file ({detail}); the file may be truncated or corrupt, "
            "or from a camera this LibRaw does not know"
        ) from e


@contextlib.contextmanager
def _raw_reader(fp: str | io.BytesIO) -> Iterator[Any]:
    """rawpy's reader of a path or bytes. LibRaw opens a path itself (reading only what it needs) but takes
    UTF-8 names only; a file under any other name is read into memory for it, as bytes are."""
    import rawpy

    if isinstance(fp, str):
        try:
            fp.encode("utf-8")
        except UnicodeEncodeError:
            with open(fp, "rb") as fh:
                fp = io.BytesIO(fh.read())
    with rawpy.imread(fp) as raw:
        yield raw


def _raw_preview(raw: Any, name: str, draft_size: int | None, limit: int | None) -> Image.Image | None:
    """The embedded preview, upright, when its shorter side has `draft_size` (else `RAW_PREVIEW_MIN_SIDE`)
    pixels; else None."""
    import rawpy

    min_side = draft_size or RAW_PREVIEW_MIN_SIDE
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        with Image.open(io.BytesIO(thumb.data)) as header:  # the header only: size and orientation
            if min(header.size) < min_side:
                return None
            self_oriented = header.getexif().get(0x0112, 1) not in (0, 1)
        image = _open(io.BytesIO(thumb.data), f"{name} (embedded preview)", draft_size, limit, path=None)
    else:  # a bitmap: (height, width, 3) uint8
        if min(thumb.data.shape[:2]) < min_side:
            return None
        image, self_oriented = _from_array(thumb.data, name), False
    # Previews mostly carry no orientation of their own; the RAW's (LibRaw's flip) says how to hold them.
    flip = _RAW_FLIPS.get(raw.sizes.flip)
    return image.transpose(flip) if flip is not None and not self_oriented else image


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _upright(im: Image.Image, *, in_place: bool) -> Image.Image:
    try:
        if im.getexif().get(0x0112, 1) in (0, 1):  # 0x0112 = Orientation; skip the copy when upright
            return im
        if in_place:
            ImageOps.exif_transpose(im, in_place=True)
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        # A damaged EXIF block should not cost the picture: show it as stored.
        return im


def _for_display(im: Image.Image, name: str) -> Image.Image:
    """Upright; RGBA when the image has transparency (an alpha band or a transparent palette entry), else RGB."""
    im = _upright(im, in_place=True)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        try:
            return im.convert("RGBA")
        except (ValueError, OSError):
            pass  # a mode Pillow cannot give alpha to: shown without it, as models see it
    return _to_rgb(im, name)


def _to_rgb(im: Image.Image, name: str, *, scale_wide_grey: bool = True) -> Image.Image:
    if im.mode == "RGB":
        return im
    if scale_wide_grey and im.mode in _WIDE_GREY_MODES:
        return Image.fromarray(_to_uint8(np.asarray(im), name)).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(
            f"{name}: cannot convert colour mode {im.mode} to RGB ({_one_line(e)}); save it as RGB first"
        ) from e


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise BadImage(f"{name}: expected an HxW, HxWx3 (RGB) or HxWx4 (RGBA) array")
    im = Image.fromarray(np.ascontiguousarray(_to_uint8(a, name)))
    return im if im.mode == "RGB" else im.convert("RGB")


def _to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Scale integer or float pixels to uint8 without clipping (rules in load_image's docstring)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
        return _stretch(a.astype(np.float64), lo, hi)
    if a.dtype.kind == "f":
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        flo, fhi = float(f.min()), float(f.max())
        if flo >= 0 and fhi <= 1:
            return np.rint(f * 255).astype(np.uint8)
        if flo >= 0 and fhi <= 255:
            return np.rint(f).astype(np.uint8)
        return _stretch(f, flo, fhi)
    raise BadImage(f"{name}: pixel type {a.dtype} is not supported; pass uint8, uint16 or float pixels")


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.full(a.shape, min(max(lo, 0), 255), np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """open_clip's eval transform for `cfg`: float32 array of shape (3, height, width).

    Matches `open_clip.image_transform(cfg.size, is_train=False, ...)` applied to the same PIL image,
    including open_clip's quirks: a non-square "shortest" target always resizes bicubic, and crops that
    need padding pad with 0 in "shortest" mode but with `fill_color` in "longest" mode. As in open_clip,
    a non-RGB image is resized and padded in its own mode and converted afterwards (so a palette image
    resizes nearest-neighbour and an RGBA one premultiplied); `load_image` converts to RGB first instead.

    Memory stays bounded whatever the aspect ratio. open_clip resizes the whole image before it crops, so a
    40000x1 strip in "shortest" mode becomes a 8960000x224 image (8 GB in Pillow) of which 224x224 is kept;
    here an image whose resized size would be over `EXACT_RESIZE_LIMIT` times the output's is resampled only
    where the crop keeps it, which moves single pixels by up to 2 grey levels from open_clip's (measured in
    tests/test_imaging.py). A side that would round to 0 pixels ("longest" mode on such a strip, where
    open_clip fails) is kept 1 pixel wide.
    """
    return _gather(crop_pixels(image, cfg), _normalize_lut(cfg.mean, cfg.std))


def crop_pixels(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """`preprocess` before normalising: the resized, cropped and padded RGB bytes, uint8 (height, width, 3),
    a quarter of the model pixels' size (what `--engine ray` sends from its decode tasks to its model actors)."""
    th, tw = cfg.size
    new_w, new_h, resample = _resize_plan(image.size, cfg)
    # Where the output window falls on the resized image, and where the image lands in the output.
    (sx, dx, cw), (sy, dy, ch) = _center(new_w, tw), _center(new_h, th)
    resized = _resized_window(image, (new_w, new_h), (sx, sy, cw, ch), resample, tw * th)
    # torchvision's CenterCrop pads with 0; open_clip's CenterCropOrPad ("longest") with fill_color.
    fill = cfg.fill_color if cfg.resize_mode == "longest" else 0
    if resized.mode != "RGB":
        if (cw, ch) != (tw, th):
            # Pad before converting, as torchvision does: a fill of 40 is another colour in CMYK or P.
            resized = _pad(resized, (dx, dy, tw - cw - dx, th - ch - dy), fill)
            (dx, cw), (dy, ch) = (0, tw), (0, th)
        resized = resized.convert("RGB")
    pixels = np.asarray(resized)
    if (cw, ch) == (tw, th):
        return pixels
    padded = np.full((th, tw, 3), fill, np.uint8)
    padded[dy : dy + ch, dx : dx + cw] = pixels
    return padded


def to_model_pixels(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 (height, width, 3) from `crop_pixels` -> the model's float32 (3, height, width): the profile's
    normalisation as a table gather, so the values do not depend on where (or in which process) it runs."""
    return _gather(
        pixels, _immich_lut(cfg.mean, cfg.std) if cfg.profile == "immich" else _normalize_lut(cfg.mean, cfg.std)
    )


def _gather(pixels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    out = np.empty((3, *pixels.shape[:2]), np.float32)
    for c in range(3):
        np.take(lut[c], pixels[:, :, c], out=out[c])
    return out


def _pad(image: Image.Image, border: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's PIL constant pad (`F.pad(img, padding, fill)`) for an image of any mode."""
    bands = len(image.getbands())
    palette = image.getpalette() if image.mode == "P" else None
    padded = ImageOps.expand(image, border=border, fill=(fill,) * bands if bands > 1 else fill)
    if palette is not None:
        padded.putpalette(palette)
    return padded


def _resize_plan(size: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int, Image.Resampling]:
    """(width, height, filter) of the resize step of open_clip's eval transform, in torchvision's arithmetic."""
    th, tw = cfg.size
    w, h = size
    resample = _PIL_FILTERS[cfg.interpolation]
    if cfg.resize_mode == "squash":  # torchvision Resize((h, w))
        return tw, th, resample
    if cfg.resize_mode == "shortest" and th == tw:  # torchvision Resize(size): shorter edge to size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = th, int(th * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return new_w, new_h, resample
    # open_clip's ResizeKeepRatio (longest=1 for "longest", 0 for a non-square "shortest" target);
    # the expressions are copied so that the float rounding is the same.
    longest = 1.0 if cfg.resize_mode == "longest" else 0.0
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = round(h * 1.0 / ratio), round(w * 1.0 / ratio)
    if cfg.resize_mode == "shortest":
        resample = Image.Resampling.BICUBIC  # open_clip builds ResizeKeepRatio(image_size) here
    # "longest" rounds the short side to 0 beyond an aspect ratio of twice the target's side (448:1 at 224),
    # where torchvision fails; a 1-pixel line padded with the fill colour is as near as the image scales.
    return max(new_w, 1), max(new_h, 1), resample


# preprocess resizes the whole image, then crops, as open_clip does, while the resized image has at most this
# many times the output's pixels: then its pixels are open_clip's bit for bit. A larger one (an image more
# elongated than 16:1 in "shortest" mode) is resampled only inside the crop, so memory stays bounded.
EXACT_RESIZE_LIMIT = 16

# How far each filter reaches, in source pixels at scale 1 (Pillow's filter supports; nearest reads one pixel).
_FILTER_REACH = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0, Image.Resampling.NEAREST: 0.5}
# Pillow resizes RGBA and LA premultiplied (converting on the way in and out of each resize call).
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}


def _resized_window(
    image: Image.Image,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
    resample: Image.Resampling,
    out_pixels: int,
) -> Image.Image:
    """The part `window` (x, y, width, height) of `image` resized to `size`."""
    new_w, new_h = size
    x, y, cw, ch = window
    if new_w * new_h <= EXACT_RESIZE_LIMIT * out_pixels:
        resized = image if size == image.size else image.resize(size, resample)
        return resized if window == (0, 0, new_w, new_h) else resized.crop((x, y, x + cw, y + ch))
    if image.mode in ("1", "P"):
        resample = Image.Resampling.NEAREST  # what Pillow's resize does for these modes
    premultiplied = _PREMULTIPLIED.get(image.mode) if resample != Image.Resampling.NEAREST else None
    source = image.convert(premultiplied) if premultiplied else image
    w, h = image.size
    (x0, x1), (y0, y1) = _source_span(x, cw, new_w, w), _source_span(y, ch, new_h, h)
    # Pillow resizes horizontally, rounds to 8 bits, then resizes vertically; one resize call with a box may
    # take the other order (rounding differently), so each axis gets its own call, in Pillow's order. The
    # horizontal pass needs only the rows the vertical filter reads: a margin wider than its reach.
    reach = _FILTER_REACH[resample] * max(h / new_h, 1.0) + 2
    r0, r1 = max(0, math.floor(y0 - reach)), min(h, math.ceil(y1 + reach))
    rows = source if (r0, r1) == (0, h) else source.crop((0, r0, w, r1))
    wide = rows.resize((cw, r1 - r0), resample, box=(x0, 0, x1, r1 - r0))
    out = wide.resize((cw, ch), resample, box=(0, y0 - r0, cw, y1 - r0))
    return out.convert(image.mode) if premultiplied else out


def _source_span(start: int, length: int, resized: int, source: int) -> tuple[float, float]:
    """The interval of a source axis that resizing `source` to `resized` pixels maps onto [start, start+length)."""
    if (start, length) == (0, resized):
        return 0.0, float(source)  # exactly the full resize's scale along an axis the crop keeps whole
    scale = source / resized
    return start * scale, (start + length) * scale


def _center(size: int, target: int) -> tuple[int, int, int]:
    """(source offset, destination offset, length) of torchvision's center crop-or-pad along one axis."""
    if target > size:
        return 0, (target - size) // 2, size
    return round((size - target) / 2.0), 0, target  # Python's round, half to even, as torchvision


@functools.lru_cache(maxsize=32)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32 table of ((v / 255) - mean) / std, evaluated step by step in float32.

    ToTensor divides by 255 and Normalize subtracts then divides, each rounded to float32; doing the same
    once per byte value makes the output identical to open_clip's, and a gather is faster than arithmetic.
    """
    v = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, np.float32)[:, None]
    s = np.asarray(std, np.float32)[:, None]
    lut = (v[None, :] - m) / s
    lut.setflags(write=False)
    return lut


def decode(
    source: ImageSource,
    cfg: PreprocessConfig,
    mode: Literal["exact", "fast"] = "exact",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load and preprocess one image: float32 (3, height, width). Safe to call from many threads.

    "exact" matches open_clip; "fast" decodes through the fastest installed decoder, JPEGs at reduced scale
    (see `load_image`; its error versus "exact" is measured in tests/test_imaging.py).
    With `cfg.profile` "immich" both modes decode at full size, as Immich does (`load_image_immich`).
    """
    return to_model_pixels(decode_pixels(source, cfg, mode, max_pixels=max_pixels), cfg)


def decode_pixels(
    source: ImageSource,
    cfg: PreprocessConfig,
    mode: Literal["exact", "fast"] = "exact",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """`decode` before normalising (`to_model_pixels`): uint8 (height, width, 3)."""
    if mode not in ("exact", "fast"):
        raise UsageError(f"decode mode {mode!r} is not 'exact' or 'fast'")
    if cfg.profile == "immich":
        return crop_pixels_immich(load_image_immich(source, max_pixels=max_pixels), cfg)
    # The larger target side: a non-square target may need that many pixels along the image's shorter side.
    draft = max(cfg.size) if mode == "fast" else None
    return crop_pixels(load_image(source, draft_size=draft, max_pixels=max_pixels), cfg)


def describe_decode(cfg: PreprocessConfig, mode: Literal["exact", "fast"]) -> str:
    """What `decode(..., cfg, mode)` does here, in words a library records with its vectors:
    ``exact``, ``fast (JPEG simplejpeg)`` or ``immich`` (which has one mode)."""
    if cfg.profile == "immich":
        return "immich"
    return "exact" if mode == "exact" else f"fast ({describe_fast()})"


# -- Immich's machine-learning service (profile "immich") ---------------------------------------------------


def load_image_immich(source: ImageSource, *, max_pixels: int | None = None) -> Image.Image:
    """`source` decoded as Immich's `decode_pil` does: stored orientation (EXIF ignored), Pillow's own
    `convert('RGB')` for any other mode (alpha dropped, 16-bit grey clipped). Same limits and `BadImage`
    messages as `load_image`."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        return _plain_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)  # Immich's server sends files; arrays are a library convenience
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise BadImage(f"{name}: no data (0 bytes); pass the encoded file's contents")
        return _open(io.BytesIO(source), name, None, limit, path=None, finish=_plain_rgb)
    if isinstance(source, str | os.PathLike):
        return _open(name, name, None, limit, path=name, finish=_plain_rgb)
    raise BadImage(f"{name}: unsupported image source; pass a path, bytes, a PIL image or a numpy array")


def _plain_rgb(im: Image.Image, name: str) -> Image.Image:
    """Pillow's own ``convert('RGB')``, as Immich: 16-bit and float greyscale clipped at 255, not scaled."""
    return _to_rgb(im, name, scale_wide_grey=False)


def immich_resize_plan(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of Immich's `resize_pil` + `crop_pil`.

    The shorter side becomes `side`, the longer `int(ratio * side)`; the crop starts at
    `int(length / 2 - side / 2)`. Both truncate where open_clip (torchvision) rounds.
    """
    if width < height:
        new_w, new_h = side, int((height / width) * side)
    else:
        new_w, new_h = int((width / height) * side), side
    return new_w, new_h, int(new_w / 2 - side / 2), int(new_h / 2 - side / 2)


def preprocess_immich(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Immich's `OpenClipVisualEncoder.transform` for an RGB image: float32 (3, side, side).

    Immich crops a square of the config's first size (its `size[0]`) and always resizes bicubic, whatever the
    config's interpolation and resize_mode (immich_ml/models/clip/visual.py at 8ed3884; a later revision in
    Immich's history honours resize_mode "squash" and the interpolation, which differs for SigLIP configs).
    Its pixels are reproduced exactly; memory stays bounded on extreme aspect ratios
    as in `preprocess` (beyond `EXACT_RESIZE_LIMIT`, where Immich itself would allocate gigabytes).
    """
    return _gather(crop_pixels_immich(image, cfg), _immich_lut(cfg.mean, cfg.std))


def crop_pixels_immich(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """`preprocess_immich` before normalising: uint8 (side, side, 3)."""
    side = cfg.size[0]
    new_w, new_h, left, top = immich_resize_plan(image.width, image.height, side)
    cropped = _resized_window(image, (new_w, new_h), (left, top, side, side), Image.Resampling.BICUBIC, side * side)
    return np.asarray(cropped if cropped.mode == "RGB" else cropped.convert("RGB"))


@functools.lru_cache(maxsize=32)
def _immich_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32 table of Immich's `normalize(to_numpy(img))`, in its float32 operations and order:
    `v / 255.0`, then `*= 1.0 / std`, then `-= mean / std` (not open_clip's `(v - mean) / std`)."""
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    v = np.arange(256, dtype=np.float32) / 255.0
    lut = v[None, :] * (1.0 / std32)[:, None]
    lut -= (mean32 / std32)[:, None]
    lut.setflags(write=False)
    return lut
