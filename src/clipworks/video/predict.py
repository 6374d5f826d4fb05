"""Zero-shot over frames: video_features' ``show_pred`` (top-5 prompts per frame, logits and softmax)."""

from __future__ import annotations

from importlib import resources

import numpy as np

from clipworks.ops import l2_normalize
from clipworks.runtime.encoder import ClipModel
from clipworks.zeroshot import format_prediction_table, softmax

TOP_K = 5


def kinetics_prompts() -> list[str]:
    """video_features' default prompts: ``a photo of {label}`` for the 400 Kinetics classes, in its order."""
    text = resources.files("clipworks").joinpath("data", "kinetics400.txt").read_text(encoding="utf-8")
    return [f"a photo of {line.strip()}" for line in text.splitlines() if line.strip()]


class FramePredictor:
    """Encodes the prompts once, then scores frames as ``logit_scale * cos`` in float64, as the reference."""

    def __init__(self, model: ClipModel, texts: list[str] | None = None) -> None:
        self.texts = list(texts) if texts else kinetics_prompts()
        # video_features' clip.tokenize raises on these; we encode them cut to the context, and say so.
        self.too_long = model.tokenizer.too_long(self.texts)
        self.logit_scale = model.logit_scale
        self.text_features = l2_normalize(model.encode_texts(self.texts, normalize=False).astype(np.float64))

    def logits(self, image_embeddings: np.ndarray) -> np.ndarray:
        frames = l2_normalize(np.asarray(image_embeddings, np.float64))
        return self.logit_scale * frames @ self.text_features.T

    def format(self, image_embeddings: np.ndarray) -> str:
        """One block per frame: the header, the top-5 ``logit | prob | text`` rows and a blank line."""
        return "".join(format_predictions(self.logits(image_embeddings), self.texts))


def format_predictions(logits: np.ndarray, texts: list[str], k: int = TOP_K) -> list[str]:
    probs = softmax(logits, axis=1)
    blocks = []
    for row_logits, row_probs in zip(logits, probs, strict=True):
        order = np.argsort(-row_probs, kind="stable")[:k]
        table = format_prediction_table((row_logits[i], row_probs[i], texts[i]) for i in order)
        blocks.append(table + "\n")
    return blocks
