"""The few numeric operations every feature shares: normalise, score, pick the best.

One place for each, so "cosine", "probability" and "top k" mean the same thing in classify, interrogate,
prompt matching, video predictions, search and the service. How a model family turns cosine similarities
into probabilities (CLIP: softmax over the labels at ``logit_scale``; SigLIP: an independent sigmoid with a
learned bias) is the family's choice (``clipworks.models.family``); the arithmetic lives here.
"""

from __future__ import annotations

import numpy as np

# Below this a vector is treated as zero rather than divided into noise (as torch's F.normalize does).
NORM_EPSILON = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit rows (or vectors along ``axis``) in the input's float precision; all-zero rows stay zero, not NaN."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norms, NORM_EPSILON)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``: ``(len(a), len(b))``."""
    return l2_normalize(np.atleast_2d(a)) @ l2_normalize(np.atleast_2d(b)).T


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)  # shifted so exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    # The two-branch form never overflows exp for large |x| (the naive 1/(1+exp(-x)) does below -88).
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def top_k(scores: np.ndarray, k: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` highest scores of a 1-D array, best first; tied scores go by
    ascending ``keys`` (default: their position), at the cut as within it, so the best ``k`` are always the
    first ``k`` of the best ``k + 1``: pages read at growing offsets never repeat or skip a hit.

    ``argpartition`` first, so a query over a million rows sorts only the ``k`` it keeps.
    """
    scores = np.asarray(scores).ravel()
    k = max(0, min(int(k), len(scores)))
    if k == 0:
        return np.zeros(0, np.intp), scores[:0]
    if k < len(scores):
        candidates = _ties_at_the_cut(scores, np.argpartition(-scores, k - 1)[:k], keys)
    else:
        candidates = np.arange(len(scores))
    tiebreak = candidates if keys is None else np.asarray(keys)[candidates]
    order = candidates[np.lexsort((tiebreak, -scores[candidates]))]
    return order, scores[order]


def _ties_at_the_cut(scores: np.ndarray, candidates: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
    """``candidates`` with the scores tied with the k-th best chosen by key: argpartition keeps an arbitrary
    few of them (a photo and its copy, embedded in the same batch, score alike to the last bit)."""
    kth = scores[candidates].min()
    at_cut = scores[candidates] == kth
    tied = np.flatnonzero(scores == kth)  # ascending: by position
    if len(tied) == np.count_nonzero(at_cut):  # every tie is inside (or the k-th is NaN: none is)
        return candidates
    if keys is not None:
        tied = tied[np.argsort(np.asarray(keys)[tied], kind="stable")]
    return np.concatenate([candidates[~at_cut], tied[: np.count_nonzero(at_cut)]])
