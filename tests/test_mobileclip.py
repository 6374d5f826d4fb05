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


def _trained_looking(model):
    """A copy of ``model`` whose batch norms and layer scales are far from their initial values.

    Freshly initialised, every batch norm is the identity and FastViT's layer scales are 1e-5, so a fold that
    dropped a norm or a branch would still match; trained weights are not like that.
    """
    import copy

    import torch

    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(1 + torch.randn(module.num_features, generator=generator) * 0.2)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
        for name, parameter in model.named_parameters():
            if "layer_scale" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.5 + 0.5)
    return model.eval()


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

    model = _trained_looking(source_model(mobileclip_config).model)
    before = _train_time_branches(model.visual)
    deployed = inference_model(model)
    assert before > 0 and _train_time_branches(deployed.visual) == 0
    assert _train_time_branches(model.visual) == before  # the source model is left as open_clip built it
    image = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(
            _unit(deployed.encode_image(image).numpy()), _unit(model.encode_image(image).numpy()), atol=1e-5
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

    model = _trained_looking(Model())
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
