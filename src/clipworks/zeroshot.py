"""Zero-shot classification, tag interrogation and structured (per-category) output.

Three ways to read an image against words, all through a :class:`~clipworks.labelbank.LabelBank`:

- :func:`classify`: the labels by probability (CLIP: ``softmax(logit_scale * cos)``), best first.
- :class:`TagIndex.interrogate`: a caption made of the tags whose cosine to the image reaches a threshold,
  best first; when none does, the single best tag. Tag embeddings are cached on disk by the bank, keyed by
  the model, the template and the tag list, so a 20,000-tag vocabulary is encoded once per model.
- :class:`CategorySet.evaluate`: for each category (``{"age": ["child", "adult"], ...}``) the family's
  probabilities over its labels at the family's shared scale (CLIP: ``softmax(100 * cos)``, whatever the
  bundle's scale, so confidences compare across models) give a ``winner`` and its ``confidence``.

Builders take an ``encode`` callable (texts -> (N, D) float32) where the caller wants to route text
encoding elsewhere (the HTTP service sends it through its single inference worker).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from clipworks import ops
from clipworks.errors import UsageError
from clipworks.labelbank import DEFAULT_TEMPLATE, Encode, LabelBank, apply_template, check_labels
from clipworks.textfile import read_user_text

__all__ = [
    "DEFAULT_TEMPLATE",
    "TAG_TEMPLATE",
    "VOCABULARIES",
    "CategoryResult",
    "CategorySet",
    "Interrogation",
    "LabelScore",
    "TagIndex",
    "TagScore",
    "apply_template",
    "category_labels",
    "classify",
    "classify_embeddings",
    "load_categories",
    "load_labels_file",
    "parse_categories",
    "vocabulary",
]

# Tags are encoded as written ("oil painting", "golden retriever"), as clip-interrogator does.
TAG_TEMPLATE = "{}"
DEFAULT_THRESHOLD = 0.22
DEFAULT_TOP = 10
VOCABULARIES = ("imagenet1k",)


# video_features' show_pred table, which `clipworks classify` prints too.
PREDICTION_HEADER = "  Logits | Prob. | Label "


def format_prediction_table(rows: Iterable[tuple[float, float, str]]) -> str:
    """The header, then one ``logit | prob | label`` line per ``(logit, prob, label)`` row."""
    lines = "".join(f"{logit:8.3f} | {prob:.3f} | {label}\n" for logit, prob, label in rows)
    return f"{PREDICTION_HEADER}\n{lines}"


# -- classification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelScore:
    label: str
    logit: float
    prob: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "logit": self.logit, "prob": self.prob}


def classify_embeddings(bank: LabelBank, image_emb: np.ndarray, top_k: int | None = None) -> list[list[LabelScore]]:
    """For each image row, the bank's labels by probability, best first (at most ``top_k``)."""
    cosines = bank.cosines(image_emb)
    logits, probs = bank.scoring.logits(cosines), bank.scoring.probabilities(cosines)
    k = len(bank.labels) if top_k is None else max(1, top_k)
    return [
        [LabelScore(bank.labels[i], float(logits[r, i]), float(probs[r, i])) for i in ops.top_k(row, k)[0]]
        for r, row in enumerate(cosines)
    ]


def classify(
    model: Any,
    images: Sequence[Any],
    labels: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    top_k: int | None = 5,
    encode: Encode | None = None,
) -> list[list[LabelScore]]:
    """Zero-shot classify images (paths, bytes, PIL images, arrays) over ``labels`` filled into ``template``."""
    bank = LabelBank.build(model, labels, [template], encode=encode)
    return classify_embeddings(bank, model.encode_images(images), top_k)


def load_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label or tag a line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    text = read_user_text(p, "a label file (one label a line)")
    labels = [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    if not labels:
        raise UsageError(f"{p}: no labels in the file (one a line)")
    # Files repeat tags more often than command lines do; keep the first of each.
    return list(dict.fromkeys(labels))


def vocabulary(name: str) -> list[str]:
    """A shipped tag vocabulary: ``imagenet1k`` (the first name of each ImageNet class)."""
    if name not in VOCABULARIES:
        raise UsageError(f"vocabulary {name!r} is unknown; choose one of {', '.join(VOCABULARIES)} or --tags-file")
    text = resources.files("clipworks").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")
    return list(dict.fromkeys(line.split(",")[0].strip() for line in text.splitlines() if line.strip()))


# -- tag interrogation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagScore:
    tag: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "score": self.score}


@dataclass(frozen=True)
class Interrogation:
    caption: str
    tags: list[TagScore]

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "interrogations": [t.to_dict() for t in self.tags]}


@dataclass
class TagIndex:
    """A label bank of tags, read against images by cosine threshold rather than by probability."""

    bank: LabelBank

    @property
    def tags(self) -> list[str]:
        return self.bank.labels

    @classmethod
    def build(
        cls,
        model: Any,
        tags: Sequence[str],
        *,
        template: str = TAG_TEMPLATE,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        encode: Encode | None = None,
    ) -> TagIndex:
        """Encode ``tags`` with ``model``, through the bank's on-disk cache unless ``use_cache`` is off.

        ``cache_dir`` defaults to ``settings.tags_cache_dir()``; repeated tags count once.
        """
        folder = None
        if use_cache:
            from clipworks.settings import tags_cache_dir

            folder = Path(cache_dir) if cache_dir is not None else tags_cache_dir()
        tags = list(dict.fromkeys(tags))
        return cls(LabelBank.build(model, tags, [template], cache_dir=folder, encode=encode, what="tags"))

    def interrogate(
        self, image_emb: np.ndarray, threshold: float = DEFAULT_THRESHOLD, top: int = DEFAULT_TOP
    ) -> list[Interrogation]:
        """Per image: tags with cosine >= ``threshold``, best first, at most ``top``; else the best tag."""
        if top < 1:
            raise UsageError(f"top must be at least 1, not {top}")
        out = []
        for order, scores in self.bank.top_k(image_emb, top):
            passed = [(i, s) for i, s in zip(order, scores, strict=True) if s >= threshold] or [(order[0], scores[0])]
            tags = [TagScore(self.tags[i], float(s)) for i, s in passed]
            out.append(Interrogation(", ".join(t.tag for t in tags), tags))
        return out


# -- structured output ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryResult:
    winner: str
    confidence: float
    probs: dict[str, float]

    def to_dict(self, with_probs: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"winner": self.winner, "confidence": self.confidence}
        if with_probs:
            d["probs"] = self.probs
        return d


def parse_categories(data: Any, source: str = "categories") -> dict[str, list[str]]:
    """Check a ``{"category": ["label", ...], ...}`` mapping; raise ``UsageError`` saying what is wrong."""
    if not isinstance(data, Mapping) or not data:
        raise UsageError(f'{source}: expected a non-empty object {{"category": ["label", ...], ...}}')
    out: dict[str, list[str]] = {}
    for name, labels in data.items():
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise UsageError(f"{source}: category {name!r} must map to a non-empty list of label strings")
        out[str(name)] = check_labels(labels, f"{source}: category {name!r}")
    return out


def load_categories(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{p}: cannot read the categories file ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({e})") from e
    return parse_categories(data, str(p))


def category_labels(categories: Mapping[str, Sequence[str]]) -> list[str]:
    """Every category's labels in order, each once (the same label may sit in two categories)."""
    return list(dict.fromkeys(label for labels in categories.values() for label in labels))


@dataclass
class CategorySet:
    """Categories of mutually exclusive labels over one bank holding every category's labels in order."""

    categories: dict[str, list[str]]
    bank: LabelBank

    @classmethod
    def build(
        cls,
        model: Any,
        categories: Mapping[str, Sequence[str]],
        *,
        template: str = DEFAULT_TEMPLATE,
        encode: Encode | None = None,
    ) -> CategorySet:
        cats = parse_categories(dict(categories))
        return cls(cats, LabelBank.build(model, category_labels(cats), [template], encode=encode))

    def evaluate(self, image_emb: np.ndarray) -> list[dict[str, CategoryResult]]:
        """Per image, per category: the family's probabilities over its labels at the family's shared scale
        (CLIP: ``softmax(100 * cos)``), their argmax and its probability."""
        cosines = self.bank.cosines(image_emb)
        scoring = self.bank.scoring.shared()
        column = {label: i for i, label in enumerate(self.bank.labels)}
        results: list[dict[str, CategoryResult]] = [{} for _ in cosines]
        for name, labels in self.categories.items():
            probs = scoring.probabilities(cosines[:, [column[label] for label in labels]])
            for r, p in enumerate(probs):
                best = int(np.argmax(p))
                results[r][name] = CategoryResult(
                    labels[best], float(p[best]), {lab: float(v) for lab, v in zip(labels, p, strict=True)}
                )
        return results
