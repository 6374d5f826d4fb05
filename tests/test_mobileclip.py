"""MobileCLIP: timm FastViT-MCi image towers exported re-parameterised (folded) for inference, CLIP text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.models.bundle import load_bundle
from clipworks.runtime.encoder import ClipModel


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _train_time_branches(module) -> int:
    """How many MobileOne / RepMixer / RepCPE blocks still carry their parallel training branches."""
    return sum(1 for m in module.modules() if callable(getattr(m, "reparameterize", None)) and _unfolded(m))


def _unfolded(block) -> bool:
    # timm's re-parameterisable blocks drop these attributes once folded into one convolution.
    return any(hasattr(block, name) for name in ("rbr_conv", "rbr_skip", "mixer", "pe"))


def test_folded_image_graph_gives_open_clips_embeddings(mobileclip_bundle, mobileclip_config, source_model,
                                                        photos) -> None:  # fmt: skip
    import onnx
    import torch

    from clipworks.export.graphs import inference_model

    src = source_model(mobileclip_config)
    nodes = [node.op_type for node in onnx.load(str(mobileclip_bundle / "visual" / "model.onnx")).graph.node]
    convs_in_source = sum(isinstance(m, torch.nn.Conv2d) for m in src.model.visual.modules())
    convs_deployed = sum(isinstance(m, torch.nn.Conv2d) for m in inference_model(src.model).visual.modules())
    # Each folded block keeps one convolution, its parallel branches' and batch norms' weights summed into it.
    assert nodes.count("Conv") == convs_deployed < convs_in_source
    assert nodes.count("BatchNormalization") < sum(isinstance(m, torch.nn.BatchNorm2d) for m in src.model.modules())
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    pixels = np.stack([clip.preprocess(p) for p in photos])
    with torch.no_grad():
        expected = _unit(src.model.encode_image(torch.from_numpy(pixels)).numpy())
    np.testing.assert_allclose(clip.encode_images(photos), expected, atol=1e-4)


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
