"""Build the source torch model: an open_clip architecture with pretrained, checkpoint or random weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipworks.errors import ClipworksError, ModelNotFound, UsageError

RANDOM = "random"


@dataclass
class SourceModel:
    model: Any  # open_clip CLIP / CustomTextCLIP, eval mode, fp32, on CPU
    arch: str
    pretrained: str
    model_config: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    logit_scale: float
    # SigLIP's learned sigmoid bias; None for softmax-trained models.
    logit_bias: float | None
    source_sha256: str


def import_torch_stack() -> tuple[Any, Any]:
    try:
        import open_clip
        import torch
    except ImportError as e:
        raise ClipworksError(
            f"exporting needs torch and open_clip ({e.name} is not installed): "
            "pip install 'clipworks[export]', or pull a ready ONNX bundle with `clipworks models pull`"
        ) from e
    return torch, open_clip


def resolve_arch(model: str) -> str:
    """Accept an open_clip architecture name or a path to an open_clip model-config JSON file."""
    _, open_clip = import_torch_stack()
    path = Path(model).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelNotFound(f"model config {path} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    arch = model.replace("/", "-")
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFound(f"open_clip has no architecture {model!r}.{hint} See open_clip.list_models().")
    return arch


def weights_sha256(model: Any) -> str:
    """A checksum of the weights themselves, so bundles from the same weights are recognisable."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_source_model(model: str, pretrained: str = "openai", seed: int = 0) -> SourceModel:
    """Create the torch model. ``pretrained`` is an open_clip tag, a checkpoint path, or ``random``."""
    torch, open_clip = import_torch_stack()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA path does not export to ONNX cleanly
    arch = resolve_arch(model)
    ckpt = Path(pretrained).expanduser()
    if pretrained == RANDOM:
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip warns "no weights"
        torch.manual_seed(seed)
        net = open_clip.create_model(arch, pretrained=None)
        tag = RANDOM
    elif ckpt.suffix in {".pt", ".pth", ".bin", ".safetensors", ".npz"} or ckpt.exists():
        if not ckpt.is_file():
            raise ModelNotFound(f"checkpoint {ckpt} does not exist; pass an existing .pt/.pth/.safetensors file")
        net = _load_checkpoint(open_clip, torch, arch, ckpt)
        tag = ckpt.stem
    else:
        if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ModelNotFound(
                f"open_clip has no pretrained tag {pretrained!r} for {arch} (tags: {tags}; or 'random')"
            )
        net = _create_pretrained(open_clip, arch, pretrained)
        tag = pretrained
    net = net.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    config = open_clip.get_model_config(arch) or {}
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(net))
    return SourceModel(
        model=net,
        arch=arch,
        pretrained=tag,
        model_config=_config_for(net, config),
        preprocess_cfg=_full_preprocess_cfg(preprocess_cfg),
        logit_scale=float(net.logit_scale.exp().item()),
        logit_bias=float(net.logit_bias.item()) if getattr(net, "logit_bias", None) is not None else None,
        source_sha256=weights_sha256(net),
    )


def load_source_tokenizer(src: SourceModel) -> Any:
    """open_clip's own tokenizer for the model (``SimpleTokenizer`` for CLIP text, ``HFTokenizer`` otherwise).

    Hugging Face tokenizers come from the hub (or its cache) by the name in the model config; offline and
    uncached, that fails with one clear error instead of huggingface_hub's retries.
    """
    _, open_clip = import_torch_stack()
    context_length = int(src.model_config["text_cfg"]["context_length"])
    name = src.model_config["text_cfg"].get("hf_tokenizer_name")
    if not name:
        return open_clip.get_tokenizer(src.arch, context_length=context_length)
    import huggingface_hub.constants as hf_constants

    unreachable = None if Path(name).expanduser().is_dir() else _hub_unreachable()
    was_offline = hf_constants.HF_HUB_OFFLINE
    if unreachable:
        hf_constants.HF_HUB_OFFLINE = True  # read the cache only
    try:
        return open_clip.get_tokenizer(src.arch, context_length=context_length)
    except ImportError as e:
        raise ClipworksError(f"the tokenizer of {src.arch} needs {e.name} (pip install 'clipworks[export]')") from e
    except Exception as e:  # network, hub, cache or file failures all end here
        why = f"the hub is unreachable: {unreachable}" if unreachable else f"{type(e).__name__}: {str(e)[:160]}"
        raise ModelNotFound(
            f"cannot get the tokenizer {name!r} of {src.arch} ({why}); run the export again with network access"
        ) from e
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline


def _hub_unreachable() -> str | None:
    """Why the weights hub cannot be reached (None if it can), found in seconds rather than retries."""
    import urllib.error
    import urllib.request

    from clipworks import settings

    if settings.offline():
        return "offline mode is set"
    try:
        urllib.request.urlopen(urllib.request.Request(settings.hf_endpoint(), method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        return None  # it answered: reachable
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def _create_pretrained(open_clip: Any, arch: str, tag: str) -> Any:
    """open_clip's pretrained weights; offline, only its local cache is tried, with one clear error."""
    import huggingface_hub.constants as hf_constants

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings are noise here
    unreachable = _hub_unreachable()
    was_offline = hf_constants.HF_HUB_OFFLINE
    if unreachable:
        hf_constants.HF_HUB_OFFLINE = True  # read the cache only, instead of five retries per file
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(logging.CRITICAL)  # open_clip logs its own download failure; ours below says more
    try:
        return open_clip.create_model(arch, pretrained=tag, require_pretrained=True)
    except Exception as e:  # network, hub or cache failures all end here
        why = f"the hub is unreachable: {unreachable}" if unreachable else f"{type(e).__name__}: {str(e)[:160]}"
        raise ModelNotFound(
            f"cannot get the weights of {arch}::{tag} ({why}); with network access run "
            f"`clipworks models pull {arch}::{tag}`, or export a local checkpoint "
            f"(`clipworks export {arch} --pretrained FILE --out DIR`) and pass --model DIR"
        ) from e
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline
        root.setLevel(root_level)


def _load_checkpoint(open_clip: Any, torch: Any, arch: str, path: Path) -> Any:
    """Load an OpenAI-format file (TorchScript archive or state dict, as CLIP-custom.pth) or an open_clip one."""
    try:
        return open_clip.load_openai_model(str(path), device="cpu")
    except Exception:
        pass  # not OpenAI format: try open_clip's own checkpoint layout
    net = open_clip.create_model(arch, pretrained=None)
    try:
        open_clip.load_checkpoint(net, str(path))
    except Exception as e:
        raise UsageError(
            f"{path} is neither an OpenAI CLIP checkpoint nor an open_clip checkpoint for {arch} "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    return net


def _config_for(net: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The open_clip config, with the values the runtime reads made certain from the built model."""
    config = dict(config)
    config.setdefault("embed_dim", int(net.text_projection.shape[-1]) if hasattr(net, "text_projection") else None)
    text_cfg = dict(config.get("text_cfg", {}))
    text_cfg.setdefault("context_length", int(getattr(net, "context_length", 77)))
    text_cfg.setdefault("vocab_size", int(getattr(net, "vocab_size", 49408)))
    config["text_cfg"] = text_cfg
    return config


def _full_preprocess_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """Spell out every field (as Immich's exporter does), so the runtime never falls back to a guess."""
    size = cfg.get("size", 224)
    size = [size, size] if isinstance(size, int) else list(size)
    return {
        "size": size,
        "mode": cfg.get("mode", "RGB"),
        "mean": list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "fill_color": cfg.get("fill_color", 0),
    }
