"""video_features' model names: registry names and OpenAI names, or ``custom`` for its own checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipworks.checksum import file_sha256
from clipworks.errors import ClipworksError, ModelNotFound

CUSTOM = "custom"
CUSTOM_CHECKPOINT = Path("models/clip/checkpoints/CLIP-custom.pth")  # relative to the working folder

# OpenAI's architectures by what their state dicts show: ViT (width, patch, resolution), ResNet block counts.
_VIT = {
    (768, 32, 224): "ViT-B-32",
    (768, 16, 224): "ViT-B-16",
    (1024, 14, 224): "ViT-L-14",
    (1024, 14, 336): "ViT-L-14-336",
}
_RESNET = {
    (3, 4, 6, 3): "RN50",
    (3, 4, 23, 3): "RN101",
    (4, 6, 10, 6): "RN50x4",
    (6, 8, 18, 8): "RN50x16",
    (3, 15, 36, 10): "RN50x64",
}


def output_name(model: str) -> str:
    """The name video_features puts in the output path: the model as given, or a bundle folder's name."""
    path = Path(model).expanduser()
    return path.name if model != CUSTOM and path.exists() else model


def resolve_model(model: str) -> str:
    """What ``clipworks.load`` takes for ``model``: the name itself, or the exported ``custom`` bundle."""
    if model != CUSTOM:
        return model
    checkpoint = CUSTOM_CHECKPOINT
    if not checkpoint.is_file():
        raise ModelNotFound(
            f"--model custom reads the checkpoint {checkpoint} (from {Path.cwd()}), which does not exist; "
            "put an OpenAI-format CLIP-custom.pth there, or pass --model NAME or a bundle folder"
        )
    return str(export_custom(checkpoint))


def openai_arch(state: dict[str, Any]) -> str:
    """The open_clip architecture of an OpenAI-format state dict, from its tensor shapes."""
    if "visual.proj" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        key: tuple[int, ...] = (width, patch, patch * grid)
        arch = _VIT.get((width, patch, patch * grid))
    else:
        key = tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
        arch = _RESNET.get(key)
    if arch is None:
        raise ModelNotFound(f"the custom checkpoint has an architecture OpenAI never released ({key}); export it "
                            "with `clipworks export ARCH --pretrained PATH` and pass --model BUNDLE")  # fmt: skip
    return arch


def export_custom(checkpoint: Path) -> Path:
    """Export the checkpoint once into the model cache, keyed by its checksum; later runs reuse it."""
    from clipworks.models.bundle import DEFAULT_PRECISIONS, is_bundle_dir
    from clipworks.settings import models_dir

    out = models_dir() / f"CLIP-custom__{file_sha256(checkpoint)[:16]}"
    if is_bundle_dir(out):
        return out
    from clipworks.export import export_model
    from clipworks.export.checkpoint import load_state_dict

    try:
        loaded = load_state_dict(checkpoint)
    except ImportError as e:
        if e.name != "torch":  # a module the checkpoint's pickle names, not the missing extra
            raise
        raise ClipworksError(
            "--model custom exports the checkpoint once and needs torch for it: pip install 'clipworks[export]'"
        ) from e
    export_model(openai_arch(loaded), out, pretrained=str(checkpoint), precisions=DEFAULT_PRECISIONS)
    return out
