"""Zero-shot over frames: video_features' ``show_pred`` (top-5 prompts per frame, logits and probabilities)."""

from __future__ import annotations

from importlib import resources

import numpy as np

from clipworks import ops
from clipworks.labelbank import LabelBank, Scoring
from clipworks.runtime.encoder import ClipModel
from clipworks.zeroshot import format_prediction_table

TOP_K = 5


def kinetics_prompts() -> list[str]:
    """video_features' default prompts: ``a photo of {label}`` for the 400 Kinetics classes, in its order."""
    text = resources.files("clipworks").joinpath("data", "kinetics400.txt").read_text(encoding="utf-8")
    return [f"a photo of {line.strip()}" for line in text.splitlines() if line.strip()]


class FramePredictor:
    """Encodes the prompts once into a float64 bank, then scores frames as ``logit_scale * cos`` in float64,
    as the reference does (the model's family turns them into probabilities)."""

    def __init__(self, model: ClipModel, texts: list[str] | None = None) -> None:
        texts = list(texts) if texts else kinetics_prompts()
        # video_features' clip.tokenize raises on these; we encode them cut to the context, and say so.
        self.too_long = model.tokenizer.too_long(texts)
        # Raw rows, normalised in float64 by the bank, as the reference normalises its float32 features;
        # texts are used as given (repeats too), as video_features does.
        raw = model.encode_texts(texts, normalize=False)
        self.bank = LabelBank.from_encoded(texts, raw, Scoring.of(model), dtype=np.float64)

    @property
    def texts(self) -> list[str]:
        return self.bank.labels

    def format(self, image_embeddings: np.ndarray) -> str:
        """One block per frame: the header, the top-5 ``logit | prob | text`` rows and a blank line."""
        cosines = self.bank.cosines(image_embeddings)
        logits, probs = self.bank.scoring.logits(cosines), self.bank.scoring.probabilities(cosines)
        blocks = []
        for row_logits, row_probs in zip(logits, probs, strict=True):
            order, _ = ops.top_k(row_probs, TOP_K)
            blocks.append(format_prediction_table((row_logits[i], row_probs[i], self.texts[i]) for i in order) + "\n")
        return "".join(blocks)
