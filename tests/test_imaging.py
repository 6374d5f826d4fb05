"""clipworks.imaging: loading every kind of input, parity with open_clip's eval transform, bad inputs.

The parity tests need open_clip (the `export` extra) and skip without it. Images are made here in a temp
folder; the sample photos shipped in clipworks/data/check_images are used too, and so is every image in
the folder named by CLIPWORKS_TEST_IMAGES when that is set (e.g. Debian opencv-doc's examples/data).
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

import clipworks.imaging
from clipworks import decoders
from clipworks.decoders import describe_fast
from clipworks.errors import BadBundle, BadImage, UsageError
from clipworks.imaging import (
    EXACT_RESIZE_LIMIT,
    IMAGE_EXTENSIONS,
    OPENAI_STD,
    PreprocessConfig,
    decode,
    decode_pixels,
    describe_decode,
    is_image_path,
    load_image,
    load_thumbnail,
    preprocess,
    to_model_pixels,
)
from memory_helpers import address_space_headroom, peak_growth_mb, png

CHECK_IMAGES = Path(clipworks.imaging.__file__).parent / "data" / "check_images"
# torchvision's PIL path and ours run the same Pillow resize and the same float32 arithmetic, so the arrays
# come out identical (observed max difference: 0.0); the bound only leaves room for a future reordering.
PARITY_ATOL = 1e-6


def natural(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, gradients, hard-edged shapes, fine grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(field)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1 + 1, y1 + 1), fill=colour)
    for _ in range(8):
        xy = rng.integers(0, max(width, height), 4).tolist()
        draw.line(xy, fill=tuple(rng.integers(0, 256, 3).tolist()), width=max(1, width // 200))
    pixels = np.asarray(field.filter(ImageFilter.GaussianBlur(max(1, width // 400))), np.float32)
    ramp = np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
    # Fine texture (foliage, fabric) in some regions only: what makes downscaling choices visible.
    noise = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    texture = np.asarray(noise.filter(ImageFilter.GaussianBlur(1)), np.float32) - 128
    where = np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4), dtype=np.uint8)).resize((width, height)))
    grain = rng.normal(0, 4, pixels.shape).astype(np.float32)
    detail = (texture * where.astype(np.float32) / 160)[:, :, None] + grain
    return Image.fromarray(np.clip(pixels + ramp + detail, 0, 255).astype(np.uint8))


# name: (width, height, file name); sizes below, at and above 224-336, odd, portrait, landscape, panorama.
SYNTHETIC = {
    "landscape_jpg": (640, 480, "landscape.jpg"),
    "portrait_png": (480, 640, "portrait.png"),
    "small_webp": (100, 75, "small.webp"),
    "odd_bmp": (223, 225, "odd.bmp"),
    "panorama_tiff": (1000, 301, "panorama.tiff"),
    "tall_jpeg": (151, 601, "tall.jpeg"),
    "square_224_png": (224, 224, "square.png"),
    "tiny_gif": (17, 9, "tiny.gif"),
    "big_jpg": (1333, 999, "big.JPG"),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    paths = {}
    for i, (name, (w, h, file)) in enumerate(SYNTHETIC.items()):
        paths[name] = folder / file
        natural(w, h, seed=i).save(paths[name], quality=90)  # only lossy formats read quality
    return paths


def real_photos() -> list[Path]:
    found = sorted(p for p in CHECK_IMAGES.glob("*") if is_image_path(p))
    extra = os.environ.get("CLIPWORKS_TEST_IMAGES")
    if extra:
        found += sorted(p for p in Path(extra).rglob("*") if is_image_path(p))
    return found


@pytest.fixture(scope="module")
def open_clip() -> Any:
    import open_clip  # the reference; CI installs the export extra, so its absence is an error, not a skip

    return open_clip


def open_clip_transform(open_clip: Any, d: dict[str, Any]) -> Callable[[Image.Image], Any]:
    """open_clip's eval transform for a preprocess_cfg dict, read by open_clip itself (not by us)."""
    size = d.get("size", 224)
    return open_clip.image_transform(
        tuple(size) if isinstance(size, list) else size,
        is_train=False,
        mean=d.get("mean"),
        std=d.get("std"),
        resize_mode=d.get("resize_mode"),
        interpolation=d.get("interpolation"),
        fill_color=d.get("fill_color", 0),
    )


# Every resize mode at the three sizes CLIP models use (224, RN50x4's 288, ViT-L/14@336), plus the corners:
# non-square targets (where open_clip takes another code path), bilinear, "random" and a grey fill colour.
CONFIGS = [
    pytest.param({"size": size, "resize_mode": mode}, id=f"{mode}-{size}")
    for size in (224, 288, 336)
    for mode in ("shortest", "longest", "squash")
] + [
    pytest.param({"size": [224, 320], "resize_mode": "shortest"}, id="shortest-224x320"),
    # open_clip resizes a non-square "shortest" target bicubic whatever the config says.
    pytest.param(
        {"size": [320, 224], "resize_mode": "shortest", "interpolation": "bilinear"},
        id="shortest-320x224-bilinear",
    ),
    pytest.param({"size": [256, 192], "resize_mode": "longest", "fill_color": 128}, id="longest-256x192-fill"),
    pytest.param({"size": [224, 320], "resize_mode": "squash"}, id="squash-224x320"),
    pytest.param({"size": 224, "interpolation": "bilinear"}, id="shortest-224-bilinear"),
    pytest.param({"size": 224, "resize_mode": "longest", "interpolation": "random"}, id="longest-224-random"),
    pytest.param(
        {"size": 224, "resize_mode": "longest", "fill_color": 255, "mean": 0.5, "std": 0.5},
        id="longest-224-scalar-mean",
    ),
]


@pytest.mark.parametrize("d", CONFIGS)
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_preprocess_matches_open_clip(open_clip: Any, synthetic: dict[str, Path], name: str, d: dict) -> None:
    image = load_image(synthetic[name])
    cfg = PreprocessConfig.from_dict(d)
    ours = preprocess(image, cfg)
    ref = open_clip_transform(open_clip, d)(image).numpy()
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape == (3, *cfg.size)
    assert np.abs(ours - ref).max() <= PARITY_ATOL


@pytest.mark.parametrize("d", CONFIGS[:9])
def test_preprocess_matches_open_clip_on_real_photos(open_clip: Any, d: dict) -> None:
    photos = real_photos()
    assert photos, f"no photos in {CHECK_IMAGES}: the package's check images are missing"
    cfg = PreprocessConfig.from_dict(d)
    transform = open_clip_transform(open_clip, d)
    worst = 0.0
    for path in photos:
        image = load_image(path)
        worst = max(worst, float(np.abs(preprocess(image, cfg) - transform(image).numpy()).max()))
    print(f"{len(photos)} photos, {d}: max abs diff {worst}")
    assert worst <= PARITY_ATOL


# As open_clip does, preprocess() resizes a non-RGB image in its own mode and converts afterwards.
@pytest.mark.parametrize(
    "d", [CONFIGS[0], CONFIGS[1], CONFIGS[11], pytest.param({"size": 224, "profile": "immich"}, id="immich")]
)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_uint8_pixels_then_normalising_is_decode_exactly(synthetic: dict[str, Path], d: Any, mode: str) -> None:
    """What `--engine ray` ships from its decode tasks (uint8, padded with the fill colour where the crop
    needs it) and normalises in the model actor must be `decode`'s float32 bit for bit, in every resize mode,
    for the Immich profile, and for a palette image converted after its padding."""
    cfg = PreprocessConfig.from_dict({k: v for k, v in d.items() if k != "profile"})
    cfg = dataclasses.replace(cfg, profile=d.get("profile", "open_clip"))
    palette = synthetic["odd_bmp"].with_name("palette.png")
    Image.open(synthetic["odd_bmp"]).convert("P").save(palette)
    for path in [*synthetic.values(), palette]:
        pixels = decode_pixels(path, cfg, mode)  # type: ignore[arg-type]
        assert pixels.dtype == np.uint8 and pixels.shape == (*cfg.size, 3)
        np.testing.assert_array_equal(to_model_pixels(pixels, cfg), decode(path, cfg, mode))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "I"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_preprocess_matches_open_clip_on_raw_modes(open_clip: Any, mode: str, resize_mode: str) -> None:
    rgba = np.dstack([np.asarray(natural(150, 110, seed=7)), np.tile(np.linspace(0, 255, 150), (110, 1))])
    image = Image.fromarray(rgba.astype(np.uint8)).convert(mode)
    d = {"size": 224, "resize_mode": resize_mode, "fill_color": 40}
    ours = preprocess(image, PreprocessConfig.from_dict(d))
    assert np.abs(ours - open_clip_transform(open_clip, d)(image).numpy()).max() <= PARITY_ATOL


def test_decode_of_rgba_matches_open_clip_after_convert(open_clip: Any, tmp_path: Path) -> None:
    # decode() drops alpha before resizing, i.e. open_clip(Image.open(p).convert("RGB")). open_clip on the
    # raw RGBA image resizes premultiplied, which turns fully transparent areas black: a different input.
    rgba = np.dstack([np.asarray(natural(150, 110, seed=8)), np.full((110, 150), 255, np.uint8)])
    rgba[:, :40, 3] = 0
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    ref = open_clip_transform(open_clip, {})(Image.open(path).convert("RGB")).numpy()
    assert np.abs(decode(path, PreprocessConfig()) - ref).max() <= PARITY_ATOL


# ----- loading: EXIF, modes, sources -----

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize(
    ("orientation", "size", "top", "bottom", "left", "right"),
    [
        (1, (60, 40), None, None, RED, BLUE),
        (3, (60, 40), None, None, BLUE, RED),  # rotated 180
        (6, (40, 60), RED, BLUE, None, None),  # stored turned left: display rotates 90 clockwise
        (8, (40, 60), BLUE, RED, None, None),  # stored turned right: display rotates 90 anticlockwise
    ],
)
def test_exif_orientation(tmp_path: Path, orientation: int, size: tuple, top, bottom, left, right) -> None:
    stored = Image.new("RGB", (60, 40), RED)
    stored.paste(BLUE, (30, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    for source in (path, path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.size == size
        a = np.asarray(image, np.float32)
        halves = {
            "top": a[: a.shape[0] // 2 - 2],
            "bottom": a[a.shape[0] // 2 + 2 :],
            "left": a[:, : a.shape[1] // 2 - 2],
            "right": a[:, a.shape[1] // 2 + 2 :],
        }
        for where, colour in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
            if colour is not None:
                assert np.abs(halves[where].mean(axis=(0, 1)) - colour).max() < 8, where


def test_exif_orientation_leaves_callers_image_alone(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 40), RED).save(path, exif=exif)
    original = Image.open(path)
    assert load_image(original).size == (40, 60)
    assert original.size == (60, 40)


def _save(image: Image.Image, name: str, **kwargs: Any) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        image.save(folder / name, **kwargs)
        return folder / name

    return write


def _palette(transparency: int | None) -> Image.Image:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([10, 200, 30, 250, 240, 5] + [0, 0, 0] * 254)
    im.paste(1, (4, 0, 8, 8))
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


def _animated(fmt: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / f"anim.{fmt}"
        frames = [Image.new("RGB", (16, 12), colour) for colour in (RED, BLUE, (0, 255, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
        assert Image.open(path).n_frames == 3
        return path

    return write


def _halves(left: tuple, right: tuple, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2], a[:, size[0] // 2 :] = left, right
    return a


_GRADIENT_16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
_GRADIENT_8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
_RGBA = np.zeros((8, 8, 4), np.uint8)
_RGBA[:, :4] = (10, 20, 30, 0)  # fully transparent, hidden colour kept (no compositing, as open_clip)
_RGBA[:, 4:] = (200, 100, 50, 255)
_FLOAT = np.linspace(0, 1, 4 * 256, dtype=np.float32).reshape(4, 256)
_FLOAT_8 = np.rint(_FLOAT.astype(np.float64) * 255).astype(np.uint8)


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


# (source made in a folder, expected RGB pixels, tolerance); file sources are written first.
MODES = [
    pytest.param(_save(Image.new("L", (8, 8), 100), "grey.png"), _grey(np.full((8, 8), 100, np.uint8)), 0, id="L"),
    pytest.param(
        _save(Image.fromarray(np.indices((8, 8)).sum(0) % 2 == 0), "bits.png"),
        _grey((np.indices((8, 8)).sum(0) % 2 == 0).astype(np.uint8) * 255),
        0,
        id="1-bit",
    ),
    pytest.param(_save(_palette(None), "pal.png"), _halves((10, 200, 30), (250, 240, 5)), 0, id="P"),
    pytest.param(_save(_palette(0), "paltrans.png"), _halves((10, 200, 30), (250, 240, 5)), 0, id="P-transparency"),
    pytest.param(_save(_palette(0), "paltrans.gif"), _halves((10, 200, 30), (250, 240, 5)), 0, id="P-transp-gif"),
    pytest.param(_save(Image.fromarray(_RGBA), "rgba.png"), _halves((10, 20, 30), (200, 100, 50)), 0, id="RGBA"),
    pytest.param(_save(Image.new("LA", (8, 8), (50, 0)), "la.png"), _grey(np.full((8, 8), 50, np.uint8)), 0, id="LA"),
    pytest.param(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.tiff"), _halves(RED, RED), 0, id="CMYK-tiff"),
    pytest.param(
        _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg", quality=100),
        _halves(RED, RED),
        3,
        id="CMYK-jpeg",
    ),
    # 16 and 32 bits are scaled down, never clipped at 255 as Pillow's convert("L") would.
    pytest.param(_save(Image.fromarray(_GRADIENT_16), "grey16.png"), _grey(_GRADIENT_8), 0, id="I;16-png"),
    pytest.param(_save(Image.fromarray(_GRADIENT_16), "grey16.tiff"), _grey(_GRADIENT_8), 0, id="I;16-tiff"),
    pytest.param(
        _save(Image.fromarray(_GRADIENT_8.astype(np.int32) * 4000 - 100_000), "int32.tiff"),
        _grey(_GRADIENT_8),
        0,
        id="I-32bit-tiff",
    ),
    pytest.param(_save(Image.fromarray(_FLOAT), "float.tiff"), _grey(_FLOAT_8), 0, id="F-tiff"),
    pytest.param(_animated("gif"), _halves(RED, RED, (16, 12)), 0, id="animated-gif"),
    pytest.param(_animated("png"), _halves(RED, RED, (16, 12)), 0, id="animated-png"),
    pytest.param(
        _animated("webp"),
        _halves(RED, RED, (16, 12)),
        0,
        id="animated-webp",
    ),
    # In-memory sources.
    pytest.param(lambda _: _halves(RED, BLUE), _halves(RED, BLUE), 0, id="array-HxWx3"),
    pytest.param(lambda _: _RGBA.copy(), _halves((10, 20, 30), (200, 100, 50)), 0, id="array-HxWx4"),
    pytest.param(lambda _: np.full((8, 8), 7, np.uint8), _grey(np.full((8, 8), 7, np.uint8)), 0, id="array-HxW"),
    pytest.param(lambda _: np.full((8, 8, 1), 7, np.uint8), _grey(np.full((8, 8), 7, np.uint8)), 0, id="array-HxWx1"),
    pytest.param(lambda _: _GRADIENT_16, _grey(_GRADIENT_8), 0, id="array-uint16"),
    pytest.param(lambda _: _FLOAT, _grey(_FLOAT_8), 0, id="array-float-0-1"),
    pytest.param(lambda _: np.eye(8, dtype=bool), _grey(np.eye(8, dtype=np.uint8) * 255), 0, id="array-bool"),
    pytest.param(lambda _: _halves(RED, BLUE)[:, ::-1], _halves(BLUE, RED), 0, id="array-strided"),
    pytest.param(lambda _: Image.fromarray(_RGBA), _halves((10, 20, 30), (200, 100, 50)), 0, id="PIL-RGBA"),
    pytest.param(
        lambda folder: _save(Image.new("L", (8, 8), 100), "b.png")(folder).read_bytes(),
        _grey(np.full((8, 8), 100, np.uint8)),
        0,
        id="bytes",
    ),
]


@pytest.mark.parametrize(("make", "expected", "tolerance"), MODES)
def test_load_image_modes(tmp_path: Path, make: Callable[[Path], Any], expected: np.ndarray, tolerance: int) -> None:
    image = load_image(make(tmp_path))
    assert image.mode == "RGB"
    got = np.asarray(image).astype(np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance


def test_rgb_pil_image_is_not_copied() -> None:
    image = Image.new("RGB", (5, 5))
    assert load_image(image) is image


# ----- bad inputs -----


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


def _file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data() if callable(data) else data)
        return folder / name

    return write


def _encoded(fmt: str, cut: float = 1.0) -> Callable[[], bytes]:
    def encode() -> bytes:
        buffer = io.BytesIO()
        natural(300, 200).save(buffer, fmt)
        data = buffer.getvalue()
        return data[: int(len(data) * cut)]

    return encode


_NOISE = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()

# (source made in a folder, load_image keywords, words the message must contain)
BAD = [
    pytest.param(lambda f: f / "missing.jpg", {}, "no such file", id="missing-path"),
    pytest.param(_file("empty.jpg", b""), {}, "empty", id="zero-byte-file"),
    pytest.param(_file("notes.jpg", b"shopping list: eggs, milk\n" * 20), {}, "not an image", id="text-as-jpg"),
    pytest.param(_file("noise.png", _NOISE), {}, "not an image", id="random-bytes-file"),
    pytest.param(_file("half.jpg", _encoded("JPEG", 0.5)), {}, "truncated", id="truncated-jpeg"),
    pytest.param(_file("half.png", _encoded("PNG", 0.5)), {}, "truncated", id="truncated-png"),
    pytest.param(_file("bomb.png", _png_header_only(100_000, 100_000)), {}, "decompression bomb", id="bomb-header"),
    pytest.param(_file("big.png", _png_header_only(10_000, 10_000)), {}, "over the limit", id="over-max-pixels"),
    pytest.param(_file("small.png", _encoded("PNG")), {"max_pixels": 5000}, "over the limit", id="small-max_pixels"),
    pytest.param(lambda f: f, {}, "directory", id="directory"),
    pytest.param(lambda _: _NOISE, {}, "not an image", id="random-bytes"),
    pytest.param(lambda _: b"", {}, "0 bytes", id="empty-bytes"),
    pytest.param(lambda _: np.zeros((4, 4, 2), np.uint8), {}, "HxWx3", id="array-2-channels"),
    pytest.param(lambda _: np.zeros((4, 4), np.complex64), {}, "not supported", id="array-complex"),
    pytest.param(lambda _: 42, {}, "unsupported image source", id="int"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("make", "kwargs", "words"), BAD)
def test_bad_inputs_raise_bad_image(tmp_path: Path, make: Callable[[Path], Any], kwargs: dict, words: str) -> None:
    source = make(tmp_path)
    with pytest.raises(BadImage) as caught:
        load_image(source, **kwargs)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message
    if isinstance(source, Path):
        assert str(source) in message
    elif isinstance(source, bytes):
        assert f"<{len(source)} bytes>" in message
    with pytest.raises(BadImage):
        decode(source, PreprocessConfig(), "fast", **kwargs)


# ----- very elongated images: open_clip's pixels, bounded memory -----

# Past EXACT_RESIZE_LIMIT, preprocess resamples only what the crop keeps. Measured against open_clip on the
# ELONGATED table below (and on L, LA, RGBA, CMYK, P, 1 and I strips): at most 2 grey levels apart (0.030
# normalised units, in single pixels of the L and I strips) on at most 0.02% of the values, 0 for most rows.
WINDOW_ATOL = 2 / (255 * min(OPENAI_STD)) + 1e-6
WINDOW_DIFFERING = 0.001

# Strips from 15:1 (resized whole, as open_clip does) to 200:1, both ways round, 1 pixel thin included.
ELONGATED = [(3000, 200), (200, 3000), (3400, 200), (200, 3400), (777, 13), (13, 777), (1200, 8), (8, 1200),
             (200, 1), (1, 200)]  # fmt: skip
ELONGATED_CONFIGS = [
    pytest.param({"size": 224}, id="shortest-224"),
    pytest.param({"size": 336}, id="shortest-336"),
    pytest.param({"size": 224, "interpolation": "bilinear"}, id="shortest-224-bilinear"),
    pytest.param({"size": [224, 320]}, id="shortest-224x320"),
    pytest.param({"size": [320, 224], "interpolation": "bilinear"}, id="shortest-320x224-bilinear"),
    pytest.param({"size": 224, "resize_mode": "longest"}, id="longest-224"),
    pytest.param({"size": [256, 192], "resize_mode": "longest", "fill_color": 128}, id="longest-256x192-fill"),
    pytest.param({"size": 224, "resize_mode": "squash"}, id="squash-224"),
    pytest.param({"size": [224, 320], "resize_mode": "squash"}, id="squash-224x320"),
]


@pytest.mark.parametrize("d", ELONGATED_CONFIGS)
@pytest.mark.parametrize("size", ELONGATED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_matches_open_clip_on_elongated_images(open_clip: Any, size: tuple[int, int], d: dict) -> None:
    image = natural(*size, seed=size[0] + size[1])
    cfg = PreprocessConfig.from_dict(d)
    ours = preprocess(image, cfg)
    steps = open_clip_transform(open_clip, d).transforms
    resized = steps[0](image)  # open_clip's own resize: the intermediate image this path avoids
    ref = resized
    for step in steps[1:]:
        ref = step(ref)
    diff = np.abs(ours - ref.numpy())
    within_limit = resized.width * resized.height <= EXACT_RESIZE_LIMIT * cfg.size[0] * cfg.size[1]
    print(f"{size} {d}: resized to {resized.size}, max abs diff {diff.max()}, differing {np.mean(diff > 0):.5f}")
    if within_limit:
        assert diff.max() <= PARITY_ATOL
    else:
        assert diff.max() <= WINDOW_ATOL
        assert np.mean(diff > PARITY_ATOL) <= WINDOW_DIFFERING


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I", "CMYK"])
@pytest.mark.parametrize("size", [(1500, 20), (20, 1500)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_matches_open_clip_on_elongated_raw_modes(open_clip: Any, mode: str, size: tuple) -> None:
    w, h = size
    rgba = np.dstack([np.asarray(natural(w, h, seed=7)), np.tile(np.linspace(0, 255, w), (h, 1))])
    image = Image.fromarray(rgba.astype(np.uint8)).convert(mode)
    for d in ({"size": 224, "fill_color": 40}, {"size": [224, 320]}):
        diff = np.abs(
            preprocess(image, PreprocessConfig.from_dict(d)) - open_clip_transform(open_clip, d)(image).numpy()
        )
        assert diff.max() <= WINDOW_ATOL
        assert np.mean(diff > PARITY_ATOL) <= WINDOW_DIFFERING


COLOUR = (200, 30, 90)


def _animated_strip(folder: Path) -> Path:
    path = folder / "strip.gif"
    frames = [Image.new("RGB", (40000, 1), colour) for colour in (COLOUR, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


# (file made in a folder, the colour it decodes to, tolerance in grey levels). Each is a few hundred bytes
# that open_clip would resize to up to 8960000x224 pixels (8 GB) in "shortest" mode.
STRIPS = [
    pytest.param(_save(Image.new("RGB", (40000, 1), COLOUR), "wide.png"), COLOUR, 0, id="40000x1-png"),
    pytest.param(_save(Image.new("RGB", (1, 40000), COLOUR), "tall.png"), COLOUR, 0, id="1x40000-png"),
    pytest.param(_save(Image.new("RGB", (1, 40000), COLOUR), "tall.gif"), COLOUR, 0, id="1x40000-gif"),
    pytest.param(_animated_strip, COLOUR, 0, id="40000x1-animated-gif"),
    pytest.param(_save(Image.new("RGBA", (40000, 1), (*COLOUR, 90)), "alpha.png"), COLOUR, 0, id="40000x1-rgba"),
    pytest.param(_save(Image.new("LA", (1, 40000), (77, 90)), "la.png"), (77, 77, 77), 0, id="1x40000-la"),
    pytest.param(_save(Image.new("P", (40000, 1), 1), "pal.png"), (0, 0, 0), 0, id="40000x1-palette"),
    pytest.param(
        _save(Image.fromarray(np.full((40000, 1), 200 * 257, np.uint16)), "deep.png"),
        (200, 200, 200),
        0,
        id="1x40000-16bit",
    ),
    pytest.param(_save(Image.new("1", (40000, 1), 1), "bits.png"), (255, 255, 255), 0, id="40000x1-1bit"),
    pytest.param(_save(Image.new("L", (40000, 1), 77), "wide.tiff"), (77, 77, 77), 0, id="40000x1-tiff"),
    pytest.param(_save(Image.new("RGB", (1, 40000), COLOUR), "tall.bmp"), COLOUR, 0, id="1x40000-bmp"),
    pytest.param(_save(Image.new("RGB", (40000, 8), COLOUR), "wide.jpg", quality=95), COLOUR, 3, id="40000x8-jpeg"),
    pytest.param(_save(Image.new("RGB", (16383, 1), COLOUR), "wide.webp", lossless=True), COLOUR, 0, id="16383x1-webp"),
    pytest.param(_save(Image.new("RGB", (1, 1), COLOUR), "dot.png"), COLOUR, 0, id="1x1-png"),
]
STRIP_CONFIGS = [
    pytest.param(PreprocessConfig(), id="shortest-224"),
    pytest.param(PreprocessConfig(size=(336, 336), interpolation="bilinear"), id="shortest-336-bilinear"),
    pytest.param(PreprocessConfig(size=(224, 320)), id="shortest-224x320"),
    pytest.param(PreprocessConfig(size=(320, 224)), id="shortest-320x224"),
    # A 40000x1 strip scales to 224x0 here, where open_clip fails: it becomes one line in the fill colour.
    pytest.param(PreprocessConfig(resize_mode="longest", fill_color=40), id="longest-224-fill"),
    pytest.param(PreprocessConfig(size=(192, 256), resize_mode="longest"), id="longest-192x256"),
    pytest.param(PreprocessConfig(resize_mode="squash"), id="squash-224"),
]


@pytest.mark.parametrize("cfg", STRIP_CONFIGS)
@pytest.mark.parametrize(("make", "colour", "tolerance"), STRIPS)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_elongated_files_decode_in_bounded_memory(
    tmp_path: Path, make: Callable[[Path], Path], colour: tuple, tolerance: int, cfg: PreprocessConfig, mode: str
) -> None:
    path = make(tmp_path)
    with address_space_headroom(2048), peak_growth_mb() as growth:
        pixels = decode(path, cfg, mode)  # type: ignore[arg-type]
    assert growth() < 48, f"{path.name}: decoding took {growth():.0f} MB"
    assert pixels.shape == (3, *cfg.size)
    lut = clipworks.imaging._normalize_lut(cfg.mean, cfg.std)
    image = np.stack([lut[c, colour[c]] for c in range(3)])[:, None, None]
    fill = cfg.fill_color if cfg.resize_mode == "longest" else 0
    level = 1 / (255 * min(cfg.std))
    is_image = np.abs(pixels - image).max(axis=0) <= (tolerance + 1) * level
    is_fill = np.abs(pixels - lut[:, fill][:, None, None]).max(axis=0) <= 1e-6
    # Every output pixel is the strip's colour or the padding; "longest" pads, the other modes fill the frame.
    assert np.all(is_image | is_fill)
    assert is_image.any()
    if cfg.resize_mode != "longest":
        assert is_image.all()


def test_elongated_image_exactly_at_the_limit(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40000, 1), COLOUR), "wide.png")(tmp_path)
    with address_space_headroom(2048):
        assert decode(path, PreprocessConfig(), max_pixels=40000).shape == (3, 224, 224)
    with pytest.raises(BadImage) as caught:
        decode(path, PreprocessConfig(), max_pixels=39999)
    assert str(caught.value).startswith(f"{path}: 40000x1 is 40000 pixels, over the limit of 39999")


def _gif_with_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first frame is larger than the screen it declares; Pillow grows the image to the frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00\x3b"


# Files whose pixels would take far more memory than their bytes: refused before a pixel is decoded, in one
# line naming the file and its size. (file made in a folder, load_image keywords, the size the message names)
OVER_LIMIT = [
    pytest.param(_save(Image.new("RGB", (40000, 1)), "wide.png"), {"max_pixels": 20000}, "40000x1", id="strip"),
    pytest.param(_save(Image.new("L", (1, 40000)), "tall.gif"), {"max_pixels": 20000}, "1x40000", id="strip-gif"),
    pytest.param(
        _file("frame.gif", _gif_with_frame((1, 1), (9000, 9000))),
        {"max_pixels": 10**6},
        "9000x9000",
        id="gif-frame-beyond-screen",
    ),
    # 100 megapixels in 100 kB: over Pillow's MAX_IMAGE_PIXELS, the limit indexing uses by default.
    pytest.param(lambda f: png(f / "huge.png", 10000, 10000), {}, "10000x10000", id="100MP-png"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("make", "kwargs", "dimensions"), OVER_LIMIT)
def test_over_limit_images_are_refused_before_decoding(
    tmp_path: Path, make: Callable[[Path], Path], kwargs: dict, dimensions: str
) -> None:
    path = make(tmp_path)
    for load in (lambda: load_image(path, **kwargs), lambda: load_thumbnail(path, 256, **kwargs)):
        with address_space_headroom(2048), peak_growth_mb() as growth, pytest.raises(BadImage) as caught:
            load()
        message = str(caught.value)
        assert message.startswith(f"{path}: {dimensions} is ") and "over the limit" in message
        assert "\n" not in message
        assert growth() < 16


# ----- thumbnails -----


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        ((40000, 1), 256, (256, 1)),
        ((1, 40000), 128, (1, 128)),
        ((640, 480), 256, (256, 192)),
        ((480, 640), 512, (384, 512)),
        ((100, 75), 256, (100, 75)),  # never enlarged
        ((1, 1), 128, (1, 1)),
    ],
)
def test_load_thumbnail_fits_the_box_and_keeps_the_aspect(
    tmp_path: Path, size: tuple, box: int, expected: tuple
) -> None:
    path = tmp_path / "photo.png"
    (natural(*size) if min(size) > 1 else Image.new("RGB", size, COLOUR)).save(path)
    with address_space_headroom(2048):
        thumb = load_thumbnail(path, box)
    assert thumb.mode == "RGB" and thumb.size == expected


def test_load_thumbnail_drafts_jpegs_and_applies_orientation(tmp_path: Path) -> None:
    stored = Image.new("RGB", (4000, 3000), RED)
    stored.paste(BLUE, (2000, 0, 4000, 3000))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top
    path = tmp_path / "camera.jpg"
    stored.save(path, exif=exif, quality=90)
    with peak_growth_mb() as growth:
        thumb = load_thumbnail(path, 256)
    assert thumb.size == (192, 256)
    a = np.asarray(thumb, np.float32)
    assert np.abs(a[:100].mean(axis=(0, 1)) - RED).max() < 8 and np.abs(a[-100:].mean(axis=(0, 1)) - BLUE).max() < 8
    # libjpeg decodes at 1/8 scale (500x375, under 1 MB) instead of 36 MB of full-size pixels.
    assert growth() < 16


def test_load_thumbnail_leaves_callers_image_alone() -> None:
    image = Image.new("RGB", (500, 300), COLOUR)
    assert load_thumbnail(image, 100).size == (100, 60)
    assert image.size == (500, 300)


@pytest.mark.parametrize("size", [0, -5, 2.5])
def test_load_thumbnail_refuses_a_bad_size(size: Any) -> None:
    with pytest.raises(UsageError, match="thumbnail size"):
        load_thumbnail(Image.new("RGB", (5, 5)), size)


# ----- fast vs exact -----


def fast_vs_exact(source: Path, cfg: PreprocessConfig) -> tuple[float, float]:
    """Mean and max absolute difference between decode(fast) and decode(exact), in normalised units."""
    diff = np.abs(decode(source, cfg, "fast") - decode(source, cfg, "exact"))
    return float(diff.mean()), float(diff.max())


def test_fast_mode_drafts_jpegs_and_stays_close(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    natural(2000, 1500, seed=3).save(path, quality=90)
    # libjpeg scales by 1/2, 1/4 or 1/8; 1/4 is the smallest that keeps the short side >= 224.
    assert load_image(path, draft_size=224).size == (500, 375)
    assert load_image(path).size == (2000, 1500)
    for cfg in (PreprocessConfig(), PreprocessConfig(size=(336, 336))):
        mean, worst = fast_vs_exact(path, cfg)
        print(f"2000x1500 JPEG at {cfg.size}: fast vs exact mean {mean:.4f}, max {worst:.4f} (normalised units)")
        # One grey level is about 1/(255*0.27) = 0.015 normalised units; opencv-doc's photos that draft
        # (up to 1282x1110) measured mean 0.005-0.09, max 0.06-1.1.
        assert mean < 0.1
        assert worst < 1.5
    for photo in real_photos():
        mean, worst = fast_vs_exact(photo, PreprocessConfig())
        print(f"{photo.name}: fast vs exact mean {mean:.4f}, max {worst:.4f}")
        assert mean < 0.15


def test_fast_mode_is_exact_for_non_jpeg(synthetic: dict[str, Path]) -> None:
    cfg = PreprocessConfig()
    for name in ("portrait_png", "panorama_tiff", "small_webp"):
        assert np.array_equal(decode(synthetic[name], cfg, "fast"), decode(synthetic[name], cfg, "exact"))


@pytest.fixture(params=["installed", "pillow only"])
def fast_decoders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each "fast" test runs with the optional decoder (simplejpeg: CI installs it) and as on a machine
    without it, where its import fails."""
    if request.param == "pillow only":
        monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import raises ImportError
    return request.param


def test_fast_decoders_are_named_and_fall_back_to_pillow(fast_decoders: str) -> None:
    expected = {
        "installed": "JPEG simplejpeg",
        "pillow only": "JPEG pillow-draft",
    }
    assert describe_fast() == expected[fast_decoders]
    assert describe_decode(PreprocessConfig(), "fast") == f"fast ({expected[fast_decoders]})"
    assert describe_decode(PreprocessConfig(), "exact") == "exact"
    assert describe_decode(PreprocessConfig(profile="immich"), "fast") == "immich"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_fast_jpeg_decodes_scaled_and_upright(tmp_path: Path, fast_decoders: str, orientation: int) -> None:
    """DCT scaling (simplejpeg or Pillow's draft) keeps the EXIF orientation: red is on top when shown."""
    stored = Image.new("RGB", (2000, 1500), RED)
    stored.paste(BLUE, (1000, 0, 2000, 1500))  # stored: red left, blue right
    upright = stored.transpose(decoders._TRANSPOSE[orientation]) if orientation != 1 else stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "camera.jpg"
    stored.save(path, exif=exif, quality=90)
    fast, exact = load_image(path, draft_size=224), load_image(path)
    assert exact.size == upright.size
    assert fast.size == (upright.width // 4, upright.height // 4)  # 1/4: the smallest scale keeping 224
    expected = np.asarray(upright.resize(fast.size, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(fast, np.float32) - expected).mean() < 3


def test_simplejpeg_gives_pillow_drafts_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """simplejpeg is asked for draft()'s scale, so "fast" pixels do not depend on which is installed."""
    for photo in real_photos()[:3]:
        big = io.BytesIO()
        Image.open(photo).convert("RGB").resize((1000, 700), Image.Resampling.BICUBIC).save(big, "JPEG", quality=90)
        for data in (photo.read_bytes(), big.getvalue()):
            with monkeypatch.context() as m:
                m.setattr(decoders, "FAST_DECODERS", [])
                drafted = np.asarray(load_image(data, draft_size=224))
            assert np.array_equal(np.asarray(load_image(data, draft_size=224)), drafted)


def make_odd(kind: str, path: Path) -> Path:
    """Files whose colour handling differs between decoders, each made from a natural picture."""
    base = natural(300, 200, seed=7)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    exif = Image.Exif()
    exif[0x0112] = 6
    make = {
        "rgb.png": lambda: base.save(path),
        "rgba.png": lambda: rgba.save(path),
        "grey.png": lambda: base.convert("L").save(path),
        "grey16.png": lambda: Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(path),
        "palette.png": lambda: base.quantize(64).save(path),
        "rotated.png": lambda: base.save(path, exif=exif.tobytes()),
        "lossy.webp": lambda: base.save(path, quality=80),
        "rgba.webp": lambda: rgba.save(path, lossless=True),
        "rotated.webp": lambda: base.save(path, quality=90, exif=exif.tobytes()),
        "grey.jpg": lambda: base.convert("L").save(path, quality=90),
        "cmyk.jpg": lambda: base.convert("CMYK").save(path, quality=90),
        "rotated.jpg": lambda: base.save(path, quality=90, exif=exif.tobytes()),
        "progressive.jpg": lambda: base.save(path, quality=90, progressive=True),
    }
    make[kind]()
    return path


ODD_FILES = ["rgb.png", "rgba.png", "grey.png", "grey16.png", "palette.png", "rotated.png", "lossy.webp",
             "rgba.webp", "rotated.webp", "grey.jpg", "cmyk.jpg", "rotated.jpg", "progressive.jpg"]  # fmt: skip


@pytest.mark.parametrize("kind", ODD_FILES)
def test_fast_decode_of_odd_files_matches_exact(tmp_path: Path, fast_decoders: str, kind: str) -> None:
    """PNG and WebP decode to exactly load_image's pixels through any decoder; JPEGs too where no DCT scaling
    applies (these are 300x200), whichever decoder reads them and however they are stored."""
    path = make_odd(kind, tmp_path / kind)
    exact = np.asarray(load_image(path))
    fast = np.asarray(load_image(path, draft_size=224))
    assert fast.shape == exact.shape == ((300, 200, 3) if "rotated" in kind else (200, 300, 3))
    assert np.array_equal(fast, exact)


def test_fast_decode_error_versus_exact_is_reported_and_bounded(fast_decoders: str) -> None:
    """The pixel error of "fast" on camera-size JPEGs made from the sample photos (the embedding error is
    measured on a full-size ViT in test_full_size.py)."""
    cfg = PreprocessConfig()
    worst_mean = 0.0
    for photo in real_photos():
        big = io.BytesIO()
        Image.open(photo).convert("RGB").resize((1200, 900), Image.Resampling.BICUBIC).save(big, "JPEG", quality=92)
        diff = np.abs(decode(big.getvalue(), cfg, "fast") - decode(big.getvalue(), cfg, "exact"))
        print(f"{fast_decoders}: {photo.name} at 1200x900: fast vs exact mean {diff.mean():.4f}, max {diff.max():.3f}")
        worst_mean = max(worst_mean, float(diff.mean()))
    assert worst_mean < 0.05  # about 3 grey levels; measured 0.01-0.02


def test_decode_is_thread_safe(synthetic: dict[str, Path]) -> None:
    cfg = PreprocessConfig(size=(288, 288))
    jobs = [(path, mode) for path in synthetic.values() for mode in ("exact", "fast")] * 3
    alone = [decode(path, cfg, mode) for path, mode in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: decode(job[0], cfg, job[1]), jobs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


# ----- configuration, extensions, imports -----


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({}, PreprocessConfig()),
        ({"size": 224}, PreprocessConfig(size=(224, 224))),
        ({"size": [288, 288], "resize_mode": "shortest"}, PreprocessConfig(size=(288, 288))),
        ({"size": [224, 320]}, PreprocessConfig(size=(224, 320))),
        ({"interpolation": "random"}, PreprocessConfig(interpolation="bicubic")),
        ({"mean": 0.5, "std": [0.5, 0.5, 0.5]}, PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3)),
        (
            {
                "size": [336, 336],
                "mode": "RGB",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "interpolation": "bilinear",
                "resize_mode": "squash",
                "fill_color": 0,
                "unknown_future_key": 1,
            },
            PreprocessConfig((336, 336), (0.5,) * 3, (0.5,) * 3, "bilinear", "squash", 0),
        ),
        ({"resize_mode": "crop"}, "resize_mode 'crop'"),
        ({"mode": "L"}, "mode 'L'"),
        ({"size": [1, 2, 3]}, "size"),
        ({"size": [0, 224]}, "size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "zero"),
        ({"interpolation": "lanczos"}, "interpolation 'lanczos'"),
        ({"fill_color": 300}, "fill_color"),
    ],
)
def test_preprocess_config_from_dict(d: dict, expected: PreprocessConfig | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(BadBundle, match=expected):
            PreprocessConfig.from_dict(d)
    else:
        cfg = PreprocessConfig.from_dict(d)
        assert cfg == expected
        assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


def test_preprocess_config_matches_open_clip(open_clip: Any) -> None:
    defaults = PreprocessConfig.from_dict(dataclasses.asdict(open_clip.transform.PreprocessCfg()))
    assert defaults.mean == tuple(open_clip.constants.OPENAI_DATASET_MEAN)
    assert defaults.std == tuple(open_clip.constants.OPENAI_DATASET_STD)
    assert defaults == PreprocessConfig()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.jpg", True),
        ("A.JPEG", True),
        ("dir.png/x.Png", True),
        (Path("s/t.webp"), True),
        ("scan.TIF", True),
        ("x.tiff", True),
        ("x.bmp", True),
        ("x.gif", True),
        ("x.txt", False),
        ("jpg", False),
        ("x.jpg.part", False),
        ("x.heic", False),
    ],
)
def test_is_image_path(path: str | Path, expected: bool) -> None:
    assert is_image_path(path) is expected


def test_image_extensions_are_lower_case_with_dots() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif", ".gif"} == IMAGE_EXTENSIONS


def test_imaging_does_not_import_torch() -> None:
    src = str(Path(clipworks.imaging.__file__).parents[1])
    code = (
        "import sys, clipworks.imaging\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'open_clip'}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the "immich" profile: Immich's machine-learning service's pixels ----------------------------------------


def immich_reference_pixels(data: bytes, cfg: dict[str, Any]) -> np.ndarray:
    """Immich's steps, written out independently with plain Pillow and numpy (immich_ml: decode_pil,
    resize_pil, crop_pil, to_numpy, normalize, OpenClipVisualEncoder.transform): (1, 3, S, S) float32."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = cfg["size"][0] if isinstance(cfg["size"], list) else cfg["size"]
    if image.width < image.height:
        image = image.resize((size, int((image.height / image.width) * size)), resample=Image.Resampling.BICUBIC)
    else:
        image = image.resize((int((image.width / image.height) * size), size), resample=Image.Resampling.BICUBIC)
    left, upper = int(image.width / 2 - size / 2), int(image.height / 2 - size / 2)
    image = image.crop((left, upper, left + size, upper + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    mean, std = np.array(cfg["mean"], dtype=np.float32), np.array(cfg["std"], dtype=np.float32)
    array *= 1.0 / std
    array -= mean / std
    return np.expand_dims(array.transpose(2, 0, 1), 0)


def _photo_like(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resampling differences show up in every pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image.putalpha(alpha)
    elif mode in ("L", "P", "CMYK"):
        image = image.convert(mode)
    return image


def _encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def _exif_rotated_jpeg(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    return _encoded(_photo_like(width, height), "JPEG", quality=90, exif=exif.tobytes())


IMMICH_CASES = {
    "jpeg 1024x683": lambda: _encoded(_photo_like(1024, 683), "JPEG", quality=90),
    "png 1000x667": lambda: _encoded(_photo_like(1000, 667), "PNG"),
    "portrait 683x1024": lambda: _encoded(_photo_like(683, 1024, seed=1), "PNG"),
    "exif-rotated jpeg": lambda: _exif_rotated_jpeg(301, 200),
    "rgba png": lambda: _encoded(_photo_like(300, 211, "RGBA"), "PNG"),
    "palette png": lambda: _encoded(_photo_like(250, 333, "P"), "PNG"),
    "greyscale png": lambda: _encoded(_photo_like(333, 250, "L"), "PNG"),
    "cmyk jpeg": lambda: _encoded(_photo_like(257, 190, "CMYK"), "JPEG"),
    "square webp": lambda: _encoded(_photo_like(200, 200), "WEBP", lossless=True),
    "tiny 3x1": lambda: _encoded(_photo_like(3, 1), "PNG"),
}
IMMICH_CFGS = {
    "224 openai": {"size": [224, 224], "mean": list(clipworks.imaging.OPENAI_MEAN), "std": list(OPENAI_STD),
                   "interpolation": "bicubic", "resize_mode": "shortest"},
    "64 siglip-style": {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                        "resize_mode": "squash"},
}  # fmt: skip


@pytest.mark.parametrize("cfg_name", IMMICH_CFGS)
@pytest.mark.parametrize("case", IMMICH_CASES)
def test_immich_profile_gives_immichs_pixels_exactly(case: str, cfg_name: str) -> None:
    data, raw = IMMICH_CASES[case](), IMMICH_CFGS[cfg_name]
    cfg = dataclasses.replace(PreprocessConfig.from_dict(raw), profile="immich")
    ours = decode(data, cfg)
    assert ours.dtype == np.float32 and ours.shape == (3, cfg.size[0], cfg.size[0])
    np.testing.assert_array_equal(ours, immich_reference_pixels(data, raw)[0])


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("jpeg 1024x683", "open_clip crops at round(15.5) = 16 where Immich's int() gives 15 (at 64 px)"),
        ("png 1000x667", "the same half-pixel offset"),
        ("exif-rotated jpeg", "open_clip turns the photo upright first"),
        ("rgba png", "the crop offset again; alpha is dropped by both"),
    ],
)
def test_immich_pixels_differ_from_open_clips_where_immich_differs(case: str, why: str) -> None:
    data = IMMICH_CASES[case]()
    cfg = PreprocessConfig(size=(64, 64))
    assert not np.array_equal(decode(data, cfg), decode(data, dataclasses.replace(cfg, profile="immich"))), why


@pytest.mark.parametrize(
    ("size", "width", "height", "plan"),
    [
        (224, 1024, 683, (335, 224, 55, 0)),  # open_clip: 335 wide, crop at round(55.5) = 56
        (224, 1000, 667, (335, 224, 55, 0)),
        (224, 683, 1024, (224, 335, 0, 55)),
        (224, 224, 224, (224, 224, 0, 0)),
        (64, 3, 1, (192, 64, 64, 0)),
    ],
)
def test_immich_resize_plan_truncates(size: int, width: int, height: int, plan: tuple[int, int, int, int]) -> None:
    assert clipworks.imaging.immich_resize_plan(width, height, size) == plan


def test_immich_profile_is_bounded_on_extreme_strips() -> None:
    # Immich would resize 20000x2 to 2240000x224 (1.5 GB) before cropping; the profile resamples the crop only.
    data = _encoded(_photo_like(20000, 2), "PNG")
    cfg = PreprocessConfig(size=(224, 224), profile="immich")
    with peak_growth_mb() as peak:
        out = decode(data, cfg)
    assert out.shape == (3, 224, 224) and peak() < 300


def test_default_profile_is_open_clip_and_unknown_profiles_are_refused() -> None:
    assert PreprocessConfig().profile == "open_clip"
    assert "profile" not in PreprocessConfig().to_dict()  # a runtime choice, not part of preprocess_cfg.json
    with pytest.raises(UsageError, match="profile 'immich2' is not one of open_clip, immich"):
        PreprocessConfig(profile="immich2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "message"),
    [(b"", "no data"), (b"not an image", "not an image format"), ("/nonexistent/x.jpg", "no such file")],
)
def test_immich_profile_refuses_bad_input_like_the_default(source: Any, message: str) -> None:
    with pytest.raises(BadImage, match=message):
        decode(source, PreprocessConfig(profile="immich"))
