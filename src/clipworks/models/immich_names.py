"""The CLIP bundles Immich publishes on the Hugging Face hub, as Immich itself lists them.

Copied verbatim from ``_OPENCLIP_MODELS`` in immich-app/immich,
``machine-learning/immich_ml/models/constants.py`` at commit 093617f56fb217900d3ae2ced40e794e14c97ff4.
Immich downloads each name from ``immich-app/<name>`` (``get_hf_model_name`` in ``immich_ml/config.py``).
The names are Immich's, not open_clip's: some LAION tags use hyphens (``laion2b-s34b-b79k``) where
open_clip's tag has underscores, which is why the registry matches them rather than formatting them.
Update this set from a newer commit when Immich publishes more bundles.
"""

from __future__ import annotations

HUB_ORGANIZATION = "immich-app"

OPENCLIP_BUNDLES: frozenset[str] = frozenset(
    {
        "RN101__openai",
        "RN101__yfcc15m",
        "RN50__cc12m",
        "RN50__openai",
        "RN50__yfcc15m",
        "RN50x16__openai",
        "RN50x4__openai",
        "RN50x64__openai",
        "ViT-B-16-SigLIP-256__webli",
        "ViT-B-16-SigLIP-384__webli",
        "ViT-B-16-SigLIP-512__webli",
        "ViT-B-16-SigLIP-i18n-256__webli",
        "ViT-B-16-SigLIP__webli",
        "ViT-B-16-plus-240__laion400m_e31",
        "ViT-B-16-plus-240__laion400m_e32",
        "ViT-B-16__laion400m_e31",
        "ViT-B-16__laion400m_e32",
        "ViT-B-16__openai",
        "ViT-B-32__laion2b-s34b-b79k",
        "ViT-B-32__laion2b_e16",
        "ViT-B-32__laion400m_e31",
        "ViT-B-32__laion400m_e32",
        "ViT-B-32__openai",
        "ViT-H-14-378-quickgelu__dfn5b",
        "ViT-H-14-quickgelu__dfn5b",
        "ViT-H-14__laion2b-s32b-b79k",
        "ViT-L-14-336__openai",
        "ViT-L-14-quickgelu__dfn2b",
        "ViT-L-14__laion2b-s32b-b82k",
        "ViT-L-14__laion400m_e31",
        "ViT-L-14__laion400m_e32",
        "ViT-L-14__openai",
        "ViT-L-16-SigLIP-256__webli",
        "ViT-L-16-SigLIP-384__webli",
        "ViT-SO400M-14-SigLIP-384__webli",
        "ViT-g-14__laion2b-s12b-b42k",
        "XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k",
        "XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k",
        "nllb-clip-base-siglip__mrl",
        "nllb-clip-base-siglip__v1",
        "nllb-clip-large-siglip__mrl",
        "nllb-clip-large-siglip__v1",
        "ViT-B-16-SigLIP2__webli",
        "ViT-B-32-SigLIP2-256__webli",
        "ViT-L-16-SigLIP2-256__webli",
        "ViT-L-16-SigLIP2-384__webli",
        "ViT-L-16-SigLIP2-512__webli",
        "ViT-SO400M-14-SigLIP2-378__webli",
        "ViT-SO400M-14-SigLIP2__webli",
        "ViT-SO400M-16-SigLIP2-256__webli",
        "ViT-SO400M-16-SigLIP2-384__webli",
        "ViT-SO400M-16-SigLIP2-512__webli",
        "ViT-gopt-16-SigLIP2-256__webli",
        "ViT-gopt-16-SigLIP2-384__webli",
        "fg-clip2-base",
    }
)


def _match_key(arch: str, tag: str) -> str:
    # Immich's names differ from open_clip's only in case and in '-' for '_' inside the tag.
    return f"{arch}__{tag}".lower().replace("-", "_")


_BY_KEY: dict[str, str] = {_match_key(*name.split("__", 1)): name for name in OPENCLIP_BUNDLES if "__" in name}


def published_repo(arch: str, tag: str) -> str | None:
    """The hub repository of Immich's bundle of open_clip's ``arch``/``tag`` weights, or None if it has none."""
    name = _BY_KEY.get(_match_key(arch, tag))
    return f"{HUB_ORGANIZATION}/{name}" if name else None
