"""Zero-shot accuracy: every image scored against a label bank of all classes, as open_clip's ``zero_shot_eval``.

The bank is CLIP's prompt ensemble (:class:`~clipworks.labelbank.LabelBank`: each class in every template,
unit rows averaged and normalised again); an image's ranking of the classes is by cosine, which every family's
probabilities preserve. Top-k counts an image as right when fewer than ``k`` classes score above its true one
(ties broken by class order, as :func:`clipworks.ops.top_k` breaks them). Accuracies are fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipworks.labelbank import LabelBank

__all__ = ["ClassAccuracy", "ZeroShotResult", "rank_of_truth", "score_zeroshot", "zeroshot_accuracy"]


@dataclass(frozen=True)
class ClassAccuracy:
    """One class: its images, their top-1 accuracy, and the classes its images were most often taken for."""

    name: str
    n: int
    top1: float
    confused_with: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.name, "n": self.n, "top1": self.top1,
            "confused_with": [{"class": c, "count": k} for c, k in self.confused_with],
        }  # fmt: skip


@dataclass(frozen=True)
class ZeroShotResult:
    top1: float
    top5: float
    n: int
    classes: int
    templates: int
    per_class: list[ClassAccuracy]

    def worst(self, count: int) -> list[ClassAccuracy]:
        """The ``count`` classes with the lowest top-1 accuracy (fewest images last among equals)."""
        return sorted(self.per_class, key=lambda c: (c.top1, -c.n, c.name))[:count]

    def to_dict(self, worst: int = 5) -> dict[str, Any]:
        return {
            "top1": self.top1, "top5": self.top5, "n": self.n, "classes": self.classes, "templates": self.templates,
            "per_class": [c.to_dict() for c in self.per_class],
            "worst": [c.to_dict() for c in self.worst(worst)],
        }  # fmt: skip


def rank_of_truth(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row, how many classes rank above the true one: higher scores, and equal ones earlier in the row."""
    scores = np.asarray(scores)
    truth = np.asarray(truth, dtype=np.intp)
    true_score = scores[np.arange(len(truth)), truth][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < truth[:, None]
    return (scores > true_score).sum(axis=1) + ((scores == true_score) & earlier).sum(axis=1)


def score_zeroshot(
    scores: np.ndarray, truth: np.ndarray, class_names: Sequence[str], templates: int = 1, confusions: int = 3
) -> ZeroShotResult:
    """Accuracies of ``scores`` ``(N, C)`` (higher is better) against true class indices ``truth``."""
    truth = np.asarray(truth, dtype=np.intp)
    n = len(truth)
    if n == 0:
        raise ValueError("no images to score")
    rank = rank_of_truth(scores, truth)
    predicted = np.argmax(scores, axis=1)  # argmax keeps the first of equal scores, as rank_of_truth does
    per_class = []
    for c in np.unique(truth):
        mine = truth == c
        wrong = predicted[mine & (predicted != c)]
        counts = np.bincount(wrong, minlength=len(class_names))
        top = [int(i) for i in np.argsort(-counts, kind="stable")[:confusions] if counts[i]]
        per_class.append(
            ClassAccuracy(
                class_names[c], int(mine.sum()), float((rank[mine] == 0).mean()),
                [(class_names[i], int(counts[i])) for i in top],
            )
        )  # fmt: skip
    return ZeroShotResult(
        float((rank == 0).mean()), float((rank < 5).mean()), n, len(class_names), templates, per_class
    )


def zeroshot_accuracy(
    model: Any, image_emb: np.ndarray, truth: np.ndarray, class_names: Sequence[str], templates: Sequence[str]
) -> ZeroShotResult:
    """Build the bank of ``class_names`` x ``templates`` with ``model`` and score the images against it."""
    bank = LabelBank.build(model, class_names, templates, what="classes")
    return score_zeroshot(bank.cosines(image_emb), truth, bank.labels, len(templates))
