"""Zero-shot classification, tag interrogation and structured (per-category) output.

Three ways to read an image against words, all on L2-normalised embeddings:

- :func:`classify`: ``softmax(logit_scale * cos)`` over a label set, best first (CLIP's zero-shot recipe).
- :class:`TagIndex.interrogate`: a caption made of the tags whose cosine to the image reaches a threshold,
  best first; when none does, the single best tag. Tag embeddings are cached on disk, keyed by the model,
  the template and the tag list, so a 20,000-tag vocabulary is encoded once per model.
- :class:`CategorySet.evaluate`: for each category (``{"age": ["child", "adult"], ...}``) a
  ``softmax(100 * cos)`` over its labels gives a ``winner`` and its ``confidence``.

Every function takes an ``encode`` callable (texts -> (N, D) normalised float32) where the caller wants to
route text encoding elsewhere (the HTTP service sends it through its single inference worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.atomic import atomic_path
from clipworks.errors import UsageError

__all__ = [
    "DEFAULT_TEMPLATE",
    "STRUCTURED_SCALE",
    "TAG_TEMPLATE",
    "VOCABULARIES",
    "CategoryResult",
    "CategorySet",
    "Interrogation",
    "LabelScore",
    "TagIndex",
    "TagScore",
    "apply_template",
    "classify",
    "classify_embeddings",
    "load_categories",
    "load_labels_file",
    "model_fingerprint",
    "parse_categories",
    "softmax",
    "tag_cache_key",
    "vocabulary",
]

DEFAULT_TEMPLATE = "a photo of a {}."
# Tags are encoded as written ("oil painting", "golden retriever"), as clip-interrogator does.
TAG_TEMPLATE = "{}"
DEFAULT_THRESHOLD = 0.22
DEFAULT_TOP = 10
# Structured output uses CLIP's trained scale whatever the bundle says, so confidences compare across models.
STRUCTURED_SCALE = 100.0
VOCABULARIES = ("imagenet1k",)

Encode = Callable[[Sequence[str]], np.ndarray]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# video_features' show_pred table, which `clipworks classify` prints too.
PREDICTION_HEADER = "  Logits | Prob. | Label "


def format_prediction_table(rows: Iterable[tuple[float, float, str]]) -> str:
    """The header, then one ``logit | prob | label`` line per ``(logit, prob, label)`` row."""
    lines = "".join(f"{logit:8.3f} | {prob:.3f} | {label}\n" for logit, prob, label in rows)
    return f"{PREDICTION_HEADER}\n{lines}"


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


def _encoder(model: Any, encode: Encode | None) -> Encode:
    return encode if encode is not None else model.encode_texts


# -- classification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelScore:
    label: str
    logit: float
    prob: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "logit": self.logit, "prob": self.prob}


def classify_embeddings(
    image_emb: np.ndarray,
    label_emb: np.ndarray,
    labels: Sequence[str],
    logit_scale: float,
    top_k: int | None = None,
) -> list[list[LabelScore]]:
    """For each image row, the labels by ``softmax(logit_scale * cos)``, best first (at most ``top_k``)."""
    logits = logit_scale * (np.atleast_2d(image_emb) @ label_emb.T)
    probs = softmax(logits)
    k = len(labels) if top_k is None else max(1, min(top_k, len(labels)))
    out = []
    for row_logits, row_probs in zip(logits, probs, strict=True):
        order = np.argsort(-row_logits, kind="stable")[:k]
        out.append([LabelScore(labels[i], float(row_logits[i]), float(row_probs[i])) for i in order])
    return out


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
    labels = _check_labels(labels, "labels")
    label_emb = _encoder(model, encode)(apply_template(template, labels))
    return classify_embeddings(model.encode_images(images), label_emb, labels, model.logit_scale, top_k)


def _check_labels(labels: Sequence[str], what: str) -> list[str]:
    labels = [str(x).strip() for x in labels]
    if not labels or any(not x for x in labels):
        raise UsageError(f"{what}: give at least one label, and no empty ones")
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise UsageError(f"{what}: duplicate labels {dupes}; each label once")
    return labels


def load_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label or tag a line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{p}: cannot read the label file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not UTF-8 text; save it as one label a line in UTF-8") from e
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


def model_fingerprint(model: Any) -> str:
    """What identifies a text tower's output: name, precision, source weights and the graph file itself.

    The graph's size and mtime stand in for its hash, so a re-export invalidates cached tag embeddings
    without reading hundreds of MB on every start.
    """
    parts = [str(getattr(model, "name", type(model).__name__)), str(getattr(model, "precision", ""))]
    bundle = getattr(model, "bundle", None)
    if bundle is not None:
        parts.append(str(getattr(bundle.meta, "source_sha256", None)))
        for precision in (getattr(model, "precision", "fp32"), "fp32"):
            graph = Path(bundle.root) / (
                "textual/model.onnx" if precision == "fp32" else f"textual/{precision}/model.onnx"
            )
            if graph.is_file():
                st = graph.stat()
                parts += [str(graph.resolve()), str(st.st_size), str(st.st_mtime_ns)]
                break
    return "|".join(parts)


def tag_cache_key(model: Any, template: str, tags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (model_fingerprint(model), template, *tags):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class TagIndex:
    """Tags and their normalised text embeddings ``(T, D)``."""

    tags: list[str]
    embeddings: np.ndarray
    template: str = TAG_TEMPLATE
    cache_path: Path | None = field(default=None, compare=False)
    from_cache: bool = field(default=False, compare=False)

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
        """Encode ``tags`` with ``model``, reading and writing the on-disk cache unless ``use_cache`` is off.

        ``cache_dir`` defaults to ``settings.tags_cache_dir()``. A cache file of the wrong shape or an
        unreadable one is recomputed and replaced, never trusted.
        """
        tags = _check_labels(list(dict.fromkeys(tags)), "tags")
        prompts = apply_template(template, tags)
        path = None
        if use_cache:
            from clipworks.settings import tags_cache_dir

            folder = Path(cache_dir) if cache_dir is not None else tags_cache_dir()
            path = folder / f"{tag_cache_key(model, template, tags)}.npy"
            cached = _read_cache(path, len(tags))
            if cached is not None:
                return cls(tags, cached, template, path, from_cache=True)
        emb = np.ascontiguousarray(_encoder(model, encode)(prompts), dtype=np.float32)
        if path is not None:
            _write_cache(path, emb)
        return cls(tags, emb, template, path)

    def scores(self, image_emb: np.ndarray) -> np.ndarray:
        """Cosines ``(N, T)`` of normalised image embeddings to every tag."""
        return np.atleast_2d(image_emb) @ self.embeddings.T

    def interrogate(
        self, image_emb: np.ndarray, threshold: float = DEFAULT_THRESHOLD, top: int = DEFAULT_TOP
    ) -> list[Interrogation]:
        """Per image: tags with cosine >= ``threshold``, best first, at most ``top``; else the best tag."""
        if top < 1:
            raise UsageError(f"top must be at least 1, not {top}")
        out = []
        for row in self.scores(image_emb):
            order = np.argsort(-row, kind="stable")
            passed = [i for i in order[:top] if row[i] >= threshold] or [int(order[0])]
            tags = [TagScore(self.tags[i], float(row[i])) for i in passed]
            out.append(Interrogation(", ".join(t.tag for t in tags), tags))
        return out


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
        return None
    return arr


def _write_cache(path: Path, emb: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.save(f, emb, allow_pickle=False)
    except OSError:
        # A read-only cache costs speed, not correctness: the embeddings are still returned.
        pass


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
        out[str(name)] = _check_labels(labels, f"{source}: category {name!r}")
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


@dataclass
class CategorySet:
    """Categories of mutually exclusive labels and the labels' embeddings, one matrix per category."""

    categories: dict[str, list[str]]
    embeddings: dict[str, np.ndarray]

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
        flat = [label for labels in cats.values() for label in labels]
        emb = _encoder(model, encode)(apply_template(template, flat))
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, labels in cats.items():
            out[name] = emb[start : start + len(labels)]
            start += len(labels)
        return cls(cats, out)

    def evaluate(self, image_emb: np.ndarray, scale: float = STRUCTURED_SCALE) -> list[dict[str, CategoryResult]]:
        """Per image, per category: ``softmax(scale * cos)`` over its labels, its argmax and probability."""
        rows = np.atleast_2d(image_emb)
        results: list[dict[str, CategoryResult]] = [{} for _ in rows]
        for name, labels in self.categories.items():
            probs = softmax(scale * (rows @ self.embeddings[name].T))
            for r, p in enumerate(probs):
                best = int(np.argmax(p))
                results[r][name] = CategoryResult(
                    labels[best], float(p[best]), {lab: float(v) for lab, v in zip(labels, p, strict=True)}
                )
        return results
