"""Model families: what differs between CLIP-style bundles at run time, in one class each.

A family decides three things and nothing else:

- which tokenizer reads the bundle's ``textual/`` files;
- whether token rows may be cut to the longest prompt in a batch (a speed-up only some text towers allow);
- how cosine similarities become probabilities (CLIP: a softmax over the labels at ``logit_scale``;
  SigLIP: an independent sigmoid per label with a learned bias).

Graphs, sessions, batching and normalisation are shared by every family (``clipworks.runtime.encoder``).
A new family is one subclass decorated with ``@register_family``. Bundles record their family in
``clipworks.json``; bundles without one (Immich's) are recognised from their open_clip ``config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from clipworks import ops
from clipworks.errors import BadBundle

if TYPE_CHECKING:
    from clipworks.models.bundle import Bundle


class TextTokenizer(Protocol):
    """What the encoder needs of a tokenizer: int64 token rows and the prompts it would cut."""

    context_length: int
    pad_id: int

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> np.ndarray: ...

    def too_long(self, texts: Sequence[str]) -> list[str]: ...


class Family:
    """Base class: subclasses set ``name`` and ``summary`` and override what differs from CLIP's defaults."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Only towers whose end-of-text output cannot see later positions (CLIP's causal mask) may drop padding.
    trims_text_padding: ClassVar[bool] = False
    # The scale used where confidences must compare across models (structured categories, Hailo's matcher)
    # instead of the bundle's own; None keeps the bundle's (a sigmoid's learned bias is fitted to its scale).
    shared_scale: ClassVar[float | None] = None

    @classmethod
    def recognises(cls, config: dict[str, Any]) -> bool:
        """Whether an open_clip model config (a bundle without a recorded family) belongs to this family."""
        return False

    def tokenizer(self, bundle: Bundle) -> TextTokenizer:
        raise NotImplementedError(f"the {self.name} family does not say how to read its tokenizer")

    def probabilities(self, cosines: np.ndarray, logit_scale: float, logit_bias: float | None) -> np.ndarray:
        """Label probabilities from cosines ``(images, labels)``; CLIP's softmax unless a family differs."""
        return ops.softmax(logit_scale * np.asarray(cosines, dtype=np.float64), axis=-1)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


FAMILIES: dict[str, type[Family]] = {}


F = TypeVar("F", bound=type[Family])


def register_family(cls: F) -> F:
    """Class decorator: make a family known by its ``name`` (later registrations are tried first)."""
    FAMILIES[cls.name] = cls
    return cls


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]()
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise BadBundle(
            f"unknown model family {name!r} (this clipworks knows {known}): upgrade clipworks or re-export the model"
        ) from None


def family_for(bundle: Bundle) -> Family:
    """The bundle's recorded family, else the one its open_clip config is recognised as."""
    if bundle.meta.family:
        return get_family(bundle.meta.family)
    return family_for_config(bundle.config)


def family_for_config(config: dict[str, Any]) -> Family:
    """The first family (newest registered first) that recognises an open_clip model config; CLIP otherwise.

    The exporter asks this of the config it exports and records the answer in ``clipworks.json``.
    """
    for cls in reversed(FAMILIES.values()):
        if cls is not ClipFamily and cls.recognises(config):
            return cls()
    return ClipFamily()


@register_family
class ClipFamily(Family):
    """OpenAI CLIP and open_clip's CLIP-text models (LAION, DataComp, DFN, MobileCLIP): BPE text, softmax."""

    name = "clip"
    summary = "CLIP BPE text tower, softmax over labels at logit_scale"
    trims_text_padding = True
    # CLIP's trained value: OpenAI's logit_scale, and the cap open_clip clamps every CLIP training at.
    shared_scale = 100.0

    def tokenizer(self, bundle: Bundle) -> TextTokenizer:
        from clipworks.tokenizer import ClipTokenizer

        return ClipTokenizer.from_dir(bundle.textual_dir, bundle.context_length)


@register_family
class SiglipFamily(Family):
    """SigLIP and SigLIP 2 (Google's sigmoid-loss towers): a Hugging Face tokenizer read as its file defines it,
    whole token rows, and an independent sigmoid per label with the learned bias.

    The text tower has no causal mask and pools the last position, so every pad token reaches the output and
    rows are never cut to the longest prompt.
    """

    name = "siglip"
    summary = "SigLIP / SigLIP 2: Hugging Face tokenizer, full-length rows, sigmoid(logit_scale * cos + logit_bias)"

    @classmethod
    def recognises(cls, config: dict[str, Any]) -> bool:
        # open_clip gives every sigmoid-loss model an init_logit_bias, and SigLIP's text towers a timm tokenizer.
        text_cfg = config.get("text_cfg", {})
        tokenizer_name = str(text_cfg.get("hf_tokenizer_name") or "")
        return "siglip" in tokenizer_name.lower() or ("init_logit_bias" in config and bool(tokenizer_name))

    def tokenizer(self, bundle: Bundle) -> TextTokenizer:
        from clipworks.file_tokenizer import FileTokenizer

        return FileTokenizer.for_open_clip(bundle.textual_dir, bundle.config)

    def probabilities(self, cosines: np.ndarray, logit_scale: float, logit_bias: float | None) -> np.ndarray:
        """``sigmoid(logit_scale * cos + logit_bias)`` per image and label: labels do not compete."""
        if logit_bias is None:
            # Immich's bundles record neither the learned scale nor the bias; a guess would print made-up odds.
            raise BadBundle(
                "this SigLIP bundle records no logit_bias (clipworks.json), so its probabilities are unknown: "
                "re-export it with `clipworks export` (or `clipworks models pull`), or rank by cosine instead"
            )
        logits = logit_scale * np.asarray(cosines, dtype=np.float64) + logit_bias
        return ops.sigmoid(logits)
