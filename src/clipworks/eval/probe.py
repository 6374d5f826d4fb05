"""The CLIP paper's linear probe: logistic regression on frozen image embeddings.

As in the paper (section 3.2 and appendix A.3), scikit-learn's L-BFGS ``LogisticRegression`` with at most
1,000 iterations; its inverse regularisation ``C`` is swept over a log grid from 1e-6 to 1e6 on a validation
split held out of the training images, then the probe is refit on all of them at the best ``C`` and scored
on the test images. The paper searches the same range with a parametric binary search over 96 steps; a
fixed 13-point grid costs a fraction of that and lands within one decade of the same ``C``. Splits are
stratified and seeded (``train_test_split``), so the same seed gives the same probe. Embeddings are the
unit vectors every clipworks command uses, so ``C`` means the same across models.

scikit-learn is the ``eval`` extra; it is imported when a probe runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipworks.errors import UsageError
from clipworks.eval.zeroshot import rank_of_truth

__all__ = ["DEFAULT_C_GRID", "ProbeResult", "fit_probe", "split_train_test"]

DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 6, 13))
MAX_ITER = 1000


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    top5: float
    c: float
    train: int
    validation: int  # of the training images, held out for the sweep of C
    test: int
    validation_top1: dict[float, float]  # each C of the sweep: its validation accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1, "top5": self.top5, "n": self.test, "C": self.c,
            "train": self.train, "validation": self.validation, "test": self.test,
            "sweep": [{"C": c, "validation_top1": a} for c, a in self.validation_top1.items()],
        }  # fmt: skip


def _sklearn() -> Any:
    from clipworks.extras import require

    require("sklearn", "eval", "the linear probe")
    from sklearn import linear_model, model_selection

    return linear_model, model_selection


def split_train_test(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified, seeded split: ``fraction`` of each class goes to the second part."""
    _, model_selection = _sklearn()
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < fraction < 1:
        raise UsageError(f"the {what} fraction must be between 0 and 1, not {fraction}")
    if counts.min() < 2:
        rare = classes[counts < 2].tolist()
        raise UsageError(f"the {what} split needs at least 2 images of each class; classes {rare} have one")
    held = max(len(classes), round(fraction * len(labels)))
    if len(labels) - held < len(classes):
        raise UsageError(
            f"{len(labels)} images of {len(classes)} classes are too few for a stratified {what} split; "
            "give more images per class"
        )
    index = np.arange(len(labels))
    first, second = model_selection.train_test_split(index, test_size=held, stratify=labels, random_state=seed)
    return np.sort(first), np.sort(second)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    linear_model, _ = _sklearn()
    clf = linear_model.LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # An unconverged fit at an extreme C of the sweep is expected; the validation score judges it.
        warnings.simplefilter("ignore")
        return clf.fit(x, y)


def _scores(clf: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Decision scores ``(N, n_classes)`` with a column for every class index, -inf where the probe saw none."""
    raw = clf.decision_function(x)
    if raw.ndim == 1:  # two classes: one margin, for the second
        raw = np.stack([-raw, raw], axis=1)
    out = np.full((len(x), n_classes), -np.inf)
    out[:, clf.classes_] = raw
    return out


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    seed: int = 0,
    validation_fraction: float = 0.2,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> ProbeResult:
    """Sweep ``C`` on a validation split of the training images (the smallest ``C`` among the best wins:
    the most regularised probe that does as well), refit on all training images, score the test images."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(np.unique(train_y)) < 2:
        raise UsageError("the linear probe needs training images of at least 2 classes")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    grid = sorted(float(c) for c in c_grid)
    sweep: dict[float, float] = {}
    n_val = 0
    if len(grid) > 1:
        fit_idx, val_idx = split_train_test(train_y, validation_fraction, seed, "validation")
        n_val = len(val_idx)
        for c in grid:
            clf = _fit(train_x[fit_idx], train_y[fit_idx], c, seed)
            sweep[c] = float((clf.predict(train_x[val_idx]) == train_y[val_idx]).mean())
        best = max(sweep.values())
        c_best = next(c for c in grid if sweep[c] == best)
    else:
        c_best = grid[0]
    clf = _fit(train_x, train_y, c_best, seed)
    rank = rank_of_truth(_scores(clf, test_x, n_classes), test_y)
    return ProbeResult(
        float((rank == 0).mean()), float((rank < 5).mean()), c_best, len(train_y), n_val, len(test_y), sweep
    )
