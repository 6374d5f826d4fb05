"""Parity at real shapes: ViT-B/32 and RN50 with random weights, end to end against open_clip.

Tiny models prove the code paths; these prove the exported graphs of the architectures users run
(12-layer ViT with 768-wide blocks, ModifiedResNet-50 with attention pooling) stay within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipworks
from clipworks.export import export_model
from clipworks.export.source import load_source_model

PROMPTS = ["a photo of a dog", "a diagram", "", "an old building with many windows on a sunny day"]


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def full_size(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp("full") / arch
    precisions = ("fp32", "int8") if arch == "ViT-B-32" else ("fp32",)
    export_model(arch, out, pretrained="random", precisions=precisions, log=lambda _: None)
    return arch, out, load_source_model(arch, "random", seed=0)


def test_real_shape_parity_with_open_clip(full_size, photos: list[Path]) -> None:
    import open_clip
    import torch

    arch, out, src = full_size
    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        ref_image = src.model.encode_image(torch.stack([transform(Image.open(p)) for p in photos]), normalize=True)
        ref_text = src.model.encode_text(open_clip.get_tokenizer(arch)(PROMPTS), normalize=True)
    model = clipworks.load(out, precision="fp32")
    np.testing.assert_allclose(model.encode_images(photos), ref_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(model.encode_texts(PROMPTS), ref_text.numpy(), atol=1e-4)
    if arch == "ViT-B-32":
        int8 = clipworks.load(out, precision="int8")
        cosine = np.sum(int8.encode_images(photos) * model.encode_images(photos), axis=1)
        assert cosine.min() >= 0.97


def test_fast_preprocess_stays_close_to_exact(full_size, photos: list[Path], tmp_path: Path) -> None:
    """fast decodes JPEGs at reduced size; report how far that moves pixels and embeddings. Indexing
    defaults to fast on the strength of the ViT's cosine staying at 0.999 or more here."""
    from clipworks.imaging import PreprocessConfig, decode

    arch, out, _ = full_size
    big = []
    for p in photos:  # camera-size JPEGs, so that draft mode really reduces the decode
        dest = tmp_path / p.name
        Image.open(p).convert("RGB").resize((1600, 1200), Image.BICUBIC).save(dest, quality=92)
        big.append(dest)
    model = clipworks.load(out, precision="fp32")
    cfg = PreprocessConfig.from_dict(model.bundle.preprocess_cfg)
    pixel_error = np.mean([np.abs(decode(p, cfg, "fast") - decode(p, cfg, "exact")).mean() for p in big])
    cosine = np.sum(model.encode_images(big, mode="fast") * model.encode_images(big, mode="exact"), axis=1)
    print(f"\n{arch}: fast vs exact mean |pixel diff| {pixel_error:.4f} (normalised units), "
          f"embedding cosine min {cosine.min():.5f} mean {cosine.mean():.5f}")  # fmt: skip
    assert pixel_error < 0.05
    assert cosine.min() >= (0.999 if arch.startswith("ViT") else 0.98)
