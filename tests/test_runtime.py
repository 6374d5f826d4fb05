"""ClipModel end to end against open_clip: real photos and prompts in, embeddings out."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipworks
from clipworks.errors import BadBundle, BadImage, UsageError

PROMPTS = [
    "a photo of a dog",
    "",
    "a close-up photo of a colourful butterfly resting on a flower in the garden",
    "Fruit & VEGETABLES &amp; more",
    "😀 emoji",
    "word " * 100,  # longer than the context: truncated, end token kept
]


def _torch_reference(src, photos: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import open_clip
    import torch

    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p)) for p in photos])
        image = src.model.encode_image(pixels, normalize=True).numpy()
        text = src.model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    return image, text


@pytest.mark.parametrize(("fixture", "config"), [("vit_bundle", "tiny-vit"), ("rn_bundle", "tiny-rn")])
def test_fp32_matches_open_clip_end_to_end(fixture, config, request, source_model, photos) -> None:
    """Decode + exact preprocess + ONNX graph vs open_clip's transform + torch model, within 1e-4."""
    model = clipworks.load(request.getfixturevalue(fixture), precision="fp32")
    ref_image, ref_text = _torch_reference(source_model(config), photos, PROMPTS)
    np.testing.assert_allclose(model.encode_images(photos, batch_size=4), ref_image, atol=1e-4)
    np.testing.assert_allclose(model.encode_texts(PROMPTS, batch_size=4), ref_text, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_lower_precisions_stay_close_to_fp32(vit_bundle: Path, photos, precision: str) -> None:
    fp32 = clipworks.load(vit_bundle, precision="fp32")
    low = clipworks.load(vit_bundle, precision=precision)
    assert low.precision == precision
    cosine = np.sum(fp32.encode_images(photos) * low.encode_images(photos), axis=1)
    assert cosine.min() >= (0.999 if precision == "fp16" else 0.97)


def test_every_input_kind_gives_the_same_embedding(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    path = photos[0]
    pil = Image.open(path)
    inputs = [path, str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    out = model.encode_images(inputs)
    np.testing.assert_allclose(out, np.repeat(out[:1], len(inputs), axis=0), atol=1e-6)


def test_outputs_are_normalised_unless_asked(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    norms = np.linalg.norm(model.encode_images(photos[:2]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    raw = model.encode_images(photos[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert model.embed_dim == 32 and model.logit_scale == pytest.approx(1 / 0.07)


def test_text_batches_pad_only_to_the_longest_prompt(vit_bundle: Path) -> None:
    """Results do not depend on how prompts are grouped: one by one equals all at once."""
    model = clipworks.load(vit_bundle)
    together = model.encode_texts(PROMPTS)
    alone = np.concatenate([model.encode_texts([t]) for t in PROMPTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert model.encode_texts([]).shape == (0, 32)


def test_text_encoder_loads_only_when_used(vit_bundle: Path, photos) -> None:
    model = clipworks.load(vit_bundle)
    model.encode_images(photos[:1])
    assert "textual" not in model.__dict__ and "tokenizer" not in model.__dict__


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / "visual" / "model.onnx").unlink(), "visual/model.onnx is missing"),
        (lambda root: (root / "config.json").unlink(), "config.json is missing"),
        (lambda root: (root / "config.json").write_text('{"embed_dim": 3'), "not valid JSON"),
        (lambda root: (root / "visual" / "preprocess_cfg.json").write_text("{}"), "has no 'size'"),
        (lambda root: (root / "visual" / "model.onnx").write_bytes(b"half"), "could not be loaded"),
        (lambda root: (root / "textual" / "tokenizer.json").unlink(), "tokenizer.json"),
    ],
)
def test_half_written_bundles_give_clear_errors(vit_bundle: Path, tmp_path: Path, breakage, message) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(vit_bundle, root)
    breakage(root)
    with pytest.raises(BadBundle, match=message):
        model = clipworks.load(root)
        model.encode_images([Image.new("RGB", (64, 64))])
        model.encode_texts(["a"])


def test_missing_precision_names_what_the_bundle_has(rn_bundle: Path) -> None:
    with pytest.raises(BadBundle, match=r"precisions \[fp32, int8\]"):
        clipworks.load(rn_bundle, precision="fp16")


def test_unknown_device_is_refused(vit_bundle: Path) -> None:
    with pytest.raises(UsageError, match="unknown device"):
        clipworks.load(vit_bundle, device="quantum").encode_images([Image.new("RGB", (8, 8))])
    with pytest.raises(UsageError, match="onnxruntime-gpu"):
        clipworks.load(vit_bundle, device="cuda:0").encode_images([Image.new("RGB", (8, 8))])


def test_a_bad_image_names_itself(vit_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(BadImage, match=r"broken\.jpg"):
        clipworks.load(vit_bundle).encode_images([bad])
    with pytest.raises(BadImage):
        clipworks.load(vit_bundle).encode_images([io.BytesIO(b"").getvalue()])
