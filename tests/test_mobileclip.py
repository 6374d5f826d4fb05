"""MobileCLIP: timm FastViT-MCi image towers re-parameterised for inference, CLIP text without a causal mask."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.models.bundle import load_bundle
from clipworks.runtime.encoder import ClipModel

# Prompts of different lengths: MobileCLIP-S's text tower sees every position, padding included.
PROMPTS = ["a photo of a dog", "a close-up photo of a colourful butterfly on a flower", "", "fruit " * 90]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _train_time_branches(module) -> int:
    """How many MobileOne / RepMixer / RepCPE blocks still carry their parallel training branches."""
    return sum(1 for m in module.modules() if callable(getattr(m, "reparameterize", None)) and _unfolded(m))


def _unfolded(block) -> bool:
    # timm's re-parameterisable blocks drop these attributes once folded into one convolution.
    return any(hasattr(block, name) for name in ("rbr_conv", "rbr_skip", "mixer", "pe"))


def test_image_embeddings_match_open_clip(mobileclip_bundle, mobileclip_config, source_model, photos) -> None:
    import torch

    src = source_model(mobileclip_config)
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    pixels = np.stack([clip.preprocess(p) for p in photos])
    with torch.no_grad():
        expected = _unit(src.model.encode_image(torch.from_numpy(pixels)).numpy())
    np.testing.assert_allclose(clip.encode_images(photos), expected, atol=1e-4)


def test_text_embeddings_match_open_clip_with_full_rows(mobileclip_bundle, mobileclip_config, source_model) -> None:
    import open_clip
    import torch

    src = source_model(mobileclip_config)
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    # Without a causal mask every pad token reaches the end-token output: the graph takes whole 77-token rows.
    assert clip.textual.input_shape[1] == 77
    with torch.no_grad():
        expected = _unit(src.model.encode_text(open_clip.tokenize(PROMPTS)).numpy())
    np.testing.assert_allclose(clip.encode_texts(PROMPTS), expected, atol=1e-4)


def test_export_folds_the_training_branches_of_a_copy(mobileclip_config, source_model) -> None:
    import torch

    from clipworks.export.graphs import inference_model

    src = source_model(mobileclip_config)
    before = _train_time_branches(src.model.visual)
    deployed = inference_model(src.model)
    assert before > 0 and _train_time_branches(deployed.visual) == 0
    assert _train_time_branches(src.model.visual) == before  # the source model is left as open_clip built it
    image = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(
            _unit(deployed.encode_image(image).numpy()), _unit(src.model.encode_image(image).numpy()), atol=1e-5
        )


def test_exported_image_graph_is_the_folded_one(mobileclip_bundle, mobileclip_config, source_model) -> None:
    import onnx
    import torch

    from clipworks.export.graphs import inference_model

    src = source_model(mobileclip_config)
    nodes = [node.op_type for node in onnx.load(str(mobileclip_bundle / "visual" / "model.onnx")).graph.node]
    for op, layer in (("Conv", torch.nn.Conv2d), ("BatchNormalization", torch.nn.BatchNorm2d)):
        in_source = sum(isinstance(m, layer) for m in src.model.visual.modules())
        deployed = sum(isinstance(m, layer) for m in inference_model(src.model).visual.modules())
        # Each folded block keeps one convolution with its BN inside; only the attention stage's norm stays a BN.
        assert nodes.count(op) == deployed < in_source, op


def test_real_fastvit_mci0_folds_faithfully() -> None:
    """The smallest real MobileCLIP image tower (MobileCLIP2-S0's), not only the tiny test one."""
    import timm
    import torch

    from clipworks.export.graphs import inference_model

    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = timm.create_model("fastvit_mci0", num_classes=16).eval()

        def encode_image(self, image: torch.Tensor) -> torch.Tensor:
            return self.visual(image)

    model = Model().eval()
    deployed = inference_model(model)
    assert _train_time_branches(deployed.visual) == 0
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(
            _unit(deployed.encode_image(image).numpy()), _unit(model.encode_image(image).numpy()), atol=1e-5
        )


@pytest.mark.parametrize(
    "arch", ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP-B", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-B"]
)
def test_open_clip_mobileclip_configs_have_their_timm_towers_and_clip_text(arch) -> None:
    import open_clip
    import timm

    from clipworks.models.family import family_for_config

    config = open_clip.get_model_config(arch)
    assert timm.is_model(config["vision_cfg"]["timm_model_name"])
    assert family_for_config(config).name == "clip"


def test_classify_through_the_cli(capsys, mobileclip_bundle, photos, tmp_path) -> None:
    labels = ["a dog", "a cat", "a car"]
    code = main(["classify", str(photos[0]), "--labels", *labels, "-m", str(mobileclip_bundle), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (result,) = json.loads(out)
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    cosines = clip.encode_images(photos[0]) @ clip.encode_texts([f"a photo of a {label}." for label in labels]).T
    assert [r["label"] for r in result["results"]] == [labels[i] for i in np.argsort(-cosines[0])]
    assert sum(r["prob"] for r in result["results"]) == pytest.approx(1.0, abs=1e-4)
