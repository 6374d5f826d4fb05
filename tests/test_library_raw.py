"""Camera RAW files (DNGs written by the tests, read back through rawpy/LibRaw): the embedded preview when one is
large enough, else a demosaic of the sensor data; the one decode entry, so indexing, embedding and search by
image all take them; a RAW beside a JPEG of its name indexed once, as the JPEG; a corrupt RAW named in one
line while the rest is indexed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipworks.cli.main import main
from clipworks.errors import BadImage
from clipworks.imaging import RAW_PREVIEW_MIN_SIDE, load_image, load_thumbnail
from clipworks.library import Library
from clipworks.library.metadata import extract_metadata
from clipworks.library.scan import image_extensions, walk
from raw_helpers import write_dng


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def raws(photos, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("raws")
    return {
        "plain": write_dng(folder / "plain.dng", photos[0]),
        "preview": write_dng(folder / "preview.dng", photos[1], preview=900, orientation=6),
        "small_preview": write_dng(folder / "small.dng", photos[2], preview=RAW_PREVIEW_MIN_SIDE // 2),
    }


def correlation(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("L").resize((64, 48)), np.float64).ravel()
    y = np.asarray(b.convert("L").resize((64, 48)), np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def test_raw_extensions_join_the_walk_when_rawpy_is_installed() -> None:
    assert {".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".raf", ".rw2"} <= image_extensions()


def test_a_dng_without_preview_is_demosaiced_at_half_size(raws, photos) -> None:
    image = load_image(raws["plain"])
    assert image.mode == "RGB" and image.size == (96, 64)  # half of the 192x128 sensor
    assert correlation(image, Image.open(photos[0])) > 0.9  # the photo's picture, not noise


def test_a_large_preview_stands_for_the_raw_upright(raws, photos) -> None:
    image = load_image(raws["preview"])
    # The 900-px preview, turned upright by the RAW's orientation (6: 90 degrees clockwise).
    assert image.size[1] == 900 and image.size[0] < 900
    upright = Image.open(photos[1]).transpose(Image.Transpose.ROTATE_270)
    assert correlation(image, upright) > 0.95
    assert load_thumbnail(raws["preview"], 128).size[1] == 128
    # Bytes (an upload) go the same way.
    assert load_image(raws["preview"].read_bytes()).size == image.size


def test_a_small_preview_is_passed_over_for_the_sensor_data(raws) -> None:
    assert load_image(raws["small_preview"]).size == (96, 64)


def test_raw_metadata_comes_from_its_tiff_header_and_libraw(raws) -> None:
    meta = extract_metadata(str(raws["preview"]))
    assert (meta.make, meta.model, meta.orientation) == ("Clipworks", "Test DNG", 6)
    assert (meta.width, meta.height) == (128, 192)  # the sensor's, upright


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_raw_is_one_line_naming_it(raws, tmp_path, damage) -> None:
    bad = tmp_path / f"{damage}.NEF"
    data = raws["plain"].read_bytes()
    bad.write_bytes(data[:400] if damage == "truncated" else b"not a raw file at all " * 50)
    with pytest.raises(BadImage) as caught:
        load_image(bad)
    message = str(caught.value)
    assert message.startswith(str(bad)) and "\n" not in message and "RAW" in message


def test_walk_finds_a_raw_beside_a_jpeg_once_as_the_jpeg(raws, photos, tmp_path) -> None:
    shutil.copy(raws["plain"], tmp_path / "IMG_1.DNG")
    shutil.copy(photos[0], tmp_path / "IMG_1.jpg")  # the extension's case differs: still the same picture
    shutil.copy(raws["plain"], tmp_path / "IMG_2.dng")
    shutil.copy(raws["plain"], tmp_path / "IMG_3.dng")
    shutil.copy(photos[0], tmp_path / "IMG_3.jpg")
    found = {os.path.basename(f.path) for f in walk(str(tmp_path), ["IMG_3.jpg"])}
    # An excluded JPEG is no developed copy: its RAW stands for the picture.
    assert found == {"IMG_1.jpg", "IMG_2.dng", "IMG_3.dng"}


def test_index_and_search_take_raws(model, raws, photos, tmp_path, capsys) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(raws["preview"], root / "pair.dng")
    shutil.copy(photos[3], root / "pair.JPG")
    shutil.copy(raws["plain"], root / "alone.dng")
    shutil.copy(raws["preview"], root / "odd name é, ü.dng")
    (root / "broken.cr2").write_bytes(raws["plain"].read_bytes()[:300])
    db = tmp_path / "lib.db"
    assert main(["index", "add", str(root), "--db", str(db), "--model", str(model.bundle.root)]) == 0
    err = capsys.readouterr().err
    broken = [line for line in err.splitlines() if "broken.cr2" in line]
    assert len(broken) == 1 and "RAW" in broken[0]
    with Library(db) as library:
        indexed = {os.path.basename(p) for p in library.store.paths_of(library.vectors().ids).values()}
        assert indexed == {"pair.JPG", "alone.dng", "odd name é, ü.dng"}
        # A RAW's vector is its picture's: the preview's vector equals that of the same DNG elsewhere.
        odd = library.store.file_by_path(str(root / "odd name é, ü.dng"))
        stored = library.store.vector(library.model_row, odd.id)
        assert np.allclose(stored, model.encode_images([raws["preview"]], mode="fast")[0], atol=1e-5)  # index: fast
    # Search by an example RAW that is not in the library, and filter by the camera its header names.
    argv = ["search", "--image", str(raws["plain"]), "--db", str(db), "--camera", "clipworks", "--json"]
    assert main(argv) == 0
    hits = {os.path.basename(h["path"]) for h in json.loads(capsys.readouterr().out)}
    assert hits == {"alone.dng", "odd name é, ü.dng"}
