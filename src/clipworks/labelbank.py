"""The label bank: labels × templates → one unit text matrix, and scores of images against it.

Every feature that reads an image against words (classify, interrogate, structured categories, Hailo's
prompt matching, video ``--show-pred``, the service, the stream) builds a :class:`LabelBank` and asks it
for cosines, probabilities or the best labels, as open_clip's ``build_zero_shot_classifier`` builds one
weight matrix that every caller multiplies by.

- Each label is filled into every template; the rows are normalised, averaged per label and normalised
  again (CLIP's prompt-ensemble recipe). One template is the plain "encode the prompt" case.
- A bank can be cached on disk, keyed by the model's fingerprint (``clipworks.models.fingerprint``),
  the templates and the labels, so a 20,000-tag vocabulary is encoded once per model.
- How cosines become probabilities is the model family's choice (:class:`Scoring`): CLIP's softmax at
  ``logit_scale``, SigLIP's sigmoid with its bias. No caller computes a softmax itself.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipworks import ops
from clipworks.atomic import atomic_path
from clipworks.errors import UsageError
from clipworks.models.family import ClipFamily, Family
from clipworks.models.fingerprint import model_fingerprint

__all__ = [
    "DEFAULT_TEMPLATE",
    "Encode",
    "LabelBank",
    "Scoring",
    "apply_template",
    "average_templates",
    "cache_key",
    "check_labels",
]

DEFAULT_TEMPLATE = "a photo of a {}."

# texts -> (N, D) float rows; the HTTP service passes one that runs on its single inference worker.
Encode = Callable[[Sequence[str]], np.ndarray]

# "a {}" / "an {}" in a template, and a label that brings its own article ("a dog", "the sea").
_ARTICLE_SLOT = re.compile(r"\b(?:a|an)\s+\{\}", re.IGNORECASE)
_OWN_ARTICLE = re.compile(r"(?:a|an|the)\s", re.IGNORECASE)


def apply_template(template: str, labels: Sequence[str]) -> list[str]:
    """Fill ``{}`` with each label. A label with its own article drops the template's ("a photo of a {}."
    with "a dog" is "a photo of a dog.", not "a photo of a a dog.")."""
    if "{}" not in template:
        raise UsageError(f"template {template!r} has no '{{}}' for the label; e.g. 'a photo of a {{}}.'")
    bare = _ARTICLE_SLOT.sub("{}", template)
    return [(bare if _OWN_ARTICLE.match(label) else template).replace("{}", label) for label in labels]


def check_labels(labels: Sequence[str], what: str) -> list[str]:
    """Labels stripped; none empty, none twice (``UsageError`` naming ``what`` otherwise)."""
    labels = [str(x).strip() for x in labels]
    if not labels or any(not x for x in labels):
        raise UsageError(f"{what}: give at least one label, and no empty ones")
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise UsageError(f"{what}: duplicate labels {dupes}; each label once")
    return labels


def average_templates(rows: np.ndarray, per_label: int, *, renormalise: bool = True) -> np.ndarray:
    """``(L * per_label, D)`` encoded prompts, label-major -> ``(L, D)``: the mean of each label's unit rows.

    ``renormalise`` off keeps the mean as it is (slightly shorter than unit length), as Hailo's app does
    for its ensemble prompts; its probabilities then agree with Hailo's.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or per_label < 1 or rows.shape[0] % per_label:
        raise ValueError(f"expected ({per_label} x labels, dim) rows, got shape {rows.shape}")
    unit = ops.l2_normalize(rows)
    mean = unit.reshape(-1, per_label, rows.shape[1]).mean(axis=1, dtype=unit.dtype)
    return ops.l2_normalize(mean) if renormalise else mean


@dataclass(frozen=True)
class Scoring:
    """How one model turns cosines into logits and probabilities: its family, scale and bias."""

    family: Family = field(default_factory=ClipFamily)
    logit_scale: float = 100.0
    logit_bias: float | None = None

    @classmethod
    def of(cls, model: Any) -> Scoring:
        """The scoring of ``model`` (a ``ClipModel``; a stand-in without a family scores as CLIP does)."""
        family = getattr(model, "family", None) or ClipFamily()
        scale = getattr(model, "logit_scale", None)
        if scale is None:
            scale = family.shared_scale
        if scale is None:
            raise ValueError(f"{family!r} has no shared scale and the model gives no logit_scale")
        return cls(family, float(scale), getattr(model, "logit_bias", None))

    def shared(self) -> Scoring:
        """This scoring at its family's cross-model scale where it has one (CLIP: 100, whatever the bundle
        says), so structured confidences and Hailo's matches compare across models."""
        scale = self.family.shared_scale
        return self if scale is None else replace(self, logit_scale=scale)

    def logits(self, cosines: np.ndarray) -> np.ndarray:
        logits = self.logit_scale * np.asarray(cosines)
        return logits if self.logit_bias is None else logits + self.logit_bias

    def probabilities(self, cosines: np.ndarray) -> np.ndarray:
        return self.family.probabilities(cosines, self.logit_scale, self.logit_bias)


@dataclass
class LabelBank:
    """Labels and their unit text embeddings ``(L, D)``, with the scoring of the model that made them."""

    labels: list[str]
    matrix: np.ndarray
    scoring: Scoring = field(default_factory=Scoring)
    templates: tuple[str, ...] = ("{}",)
    cache_path: Path | None = field(default=None, compare=False)
    from_cache: bool = field(default=False, compare=False)

    # -- building ----------------------------------------------------------------------------------
    @staticmethod
    def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
        """The texts to encode, label-major: every template for the first label, then the next."""
        filled = [apply_template(t, labels) for t in templates]
        return [per_template[i] for i in range(len(labels)) for per_template in filled]

    @classmethod
    def from_encoded(
        cls,
        labels: Sequence[str],
        rows: np.ndarray,
        scoring: Scoring,
        templates: Sequence[str] = ("{}",),
        dtype: Any = np.float32,
    ) -> LabelBank:
        """A bank from the encoded :meth:`prompts` (for callers that encode elsewhere, e.g. asynchronously)."""
        matrix = average_templates(np.asarray(rows, dtype=dtype), len(templates))
        return cls(list(labels), np.ascontiguousarray(matrix), scoring, tuple(templates))

    @classmethod
    def build(
        cls,
        model: Any,
        labels: Sequence[str],
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        encode: Encode | None = None,
        dtype: Any = np.float32,
        what: str = "labels",
    ) -> LabelBank:
        """Encode ``labels`` in each of ``templates`` with ``model`` (or ``encode``).

        With ``cache_dir`` the matrix is read from, or written to, ``<cache_dir>/<cache_key>.npy``; a cache
        file of the wrong shape, type or content is recomputed and replaced, never trusted. ``dtype``:
        the precision the rows are normalised and scored in (video_features scores in float64).
        """
        labels = check_labels(labels, what)
        templates = tuple(templates)
        if not templates:
            raise UsageError(f"{what}: give at least one template, e.g. {DEFAULT_TEMPLATE!r}")
        scoring = Scoring.of(model)
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"{cache_key(model, templates, labels, dtype)}.npy"
            cached = _read_cache(path, len(labels), getattr(model, "embed_dim", None), np.dtype(dtype))
            if cached is not None:
                return cls(labels, cached, scoring, templates, path, from_cache=True)
        rows = (encode if encode is not None else model.encode_texts)(cls.prompts(labels, templates))
        bank = cls.from_encoded(labels, rows, scoring, templates, dtype)
        if path is not None:
            _write_cache(path, bank.matrix)
            bank.cache_path = path
        return bank

    # -- scoring -----------------------------------------------------------------------------------
    def cosines(self, image_emb: np.ndarray) -> np.ndarray:
        """Cosines ``(N, L)`` of image embeddings (normalised here, in the bank's precision) to every label."""
        images = ops.l2_normalize(np.atleast_2d(np.asarray(image_emb, dtype=self.matrix.dtype)))
        return images @ self.matrix.T

    def logits(self, image_emb: np.ndarray) -> np.ndarray:
        return self.scoring.logits(self.cosines(image_emb))

    def probabilities(self, image_emb: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, L)`` as the model's family defines them."""
        return self.scoring.probabilities(self.cosines(image_emb))

    def top_k(self, image_emb: np.ndarray, k: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image, (label indices, cosines) of its ``k`` best labels (all with None), best first.

        Best by cosine is best by logit and by probability too: every family's scoring is monotonic in it.
        """
        k = len(self.labels) if k is None else k
        return [ops.top_k(row, k) for row in self.cosines(image_emb)]


def cache_key(model: Any, templates: Sequence[str], labels: Sequence[str], dtype: Any = np.float32) -> str:
    """The cache file's name: the model's fingerprint, the templates, the labels and the precision."""
    h = hashlib.sha256()
    # The template count keeps ("a", "b") + ("c",) apart from ("a",) + ("b", "c").
    for part in (model_fingerprint(model).key(), np.dtype(dtype).str, str(len(templates)), *templates, *labels):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _read_cache(path: Path, rows: int, dim: int | None, dtype: np.dtype[Any]) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != dtype or (dim is not None and arr.shape[1] != dim):
        return None
    if not np.isfinite(arr).all():
        return None
    return arr


def _write_cache(path: Path, matrix: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.save(f, matrix, allow_pickle=False)
    except OSError:
        # A read-only cache costs speed, not correctness: the matrix is still returned.
        pass
