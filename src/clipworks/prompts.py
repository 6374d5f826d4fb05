"""Prompt sets and their JSON files, and text-image matching, compatible with Hailo's CLIP app.

The file format is the one ``TextImageMatcher.save_embeddings`` writes in hailo-ai/hailo-CLIP
(``clip_app/text_image_matcher.py``)::

    {"threshold": 0.5, "text_prefix": "A photo of a ",
     "ensemble_template": ["a photo of a {}.", ...],
     "entries": [{"text": "cat", "embedding": [0.01, ...], "negative": false, "ensemble": false}, ...]}

Matching follows the same app: entries with text and an embedding take part, probabilities are
``softmax(100 * image . text)`` over all of them (negatives included), the best entry is the argmax,
and it passes when it is not negative and its probability is strictly above the threshold. The entries
form a :class:`~clipworks.labelbank.LabelBank` scored at the model family's shared scale, so a CLIP model
scores as Hailo's app does and another family (SigLIP's sigmoid) with its own probabilities.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.atomic import atomic_write_text
from clipworks.errors import BadPromptFile
from clipworks.labelbank import LabelBank, Scoring, average_templates
from clipworks.textfile import read_user_text

DEFAULT_THRESHOLD = 0.8
DEFAULT_TEXT_PREFIX = "A photo of a "
DEFAULT_ENSEMBLE_TEMPLATE: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "a photo of a big {}.",
    "a photo of a small {}.",
)
# Hailo's GUI has six text boxes and edits entry i in place; a file with fewer entries leaves the
# remaining boxes dead ("Index out of bounds"), so new sets are padded with empty slots up to six.
HAILO_SLOTS = 6
# Hailo's TextImageMatcher loads RN50x4 (model_name="RN50x4") and every JSON file its app ships holds
# 640-d RN50x4 embeddings; its device pipeline runs RN50x4's image tower, so a file for it must match.
HAILO_MODEL = "RN50x4::openai"
HAILO_DIM = 640
# The model a file was made for, written beside Hailo's keys: Hailo's load_embeddings reads only its four
# keys and ignores this one (its own save drops it; such a file is then known by its dimension again).
MODEL_KEY = "model"

_KNOWN_KEYS = ("threshold", "text_prefix", "ensemble_template", "entries")
_ENTRY_KEYS = ("text", "embedding", "negative", "ensemble")
_REENCODE_HINT = "re-encode the prompts with the model of the images (clipworks embed texts ... --model ...)"


@dataclass(eq=False)
class PromptEntry:
    """One text prompt and its embedding (None for an empty slot or a text not encoded yet).

    The embedding is kept as float64 so that the Python floats read from a file are written back
    bit for bit; embeddings computed here are float32 values, which float64 holds exactly.
    """

    text: str
    embedding: np.ndarray | None = None
    negative: bool = False
    ensemble: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embedding is not None:
            emb = np.asarray(self.embedding, dtype=np.float64).reshape(-1)
            self.embedding = emb if emb.size else None

    @property
    def active(self) -> bool:
        """Whether the entry takes part in matching: it has text and an embedding."""
        return self.text != "" and self.embedding is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PromptEntry):
            return NotImplemented
        if (self.embedding is None) != (other.embedding is None):
            return False
        same_emb = self.embedding is None or np.array_equal(self.embedding, other.embedding)
        return same_emb and (self.text, self.negative, self.ensemble, self.extra) == (
            other.text,
            other.negative,
            other.ensemble,
            other.extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as Hailo writes it (an empty slot's embedding is ``[]``), then any extra keys."""
        emb = [] if self.embedding is None else self.embedding.tolist()
        data: dict[str, Any] = {
            "text": self.text,
            "embedding": emb,
            "negative": self.negative,
            "ensemble": self.ensemble,
        }
        data.update(self.extra)
        return data


@dataclass
class PromptSet:
    """A Hailo-compatible prompt file in memory; ``extra`` keeps unknown top-level keys for saving."""

    entries: list[PromptEntry] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    text_prefix: str = DEFAULT_TEXT_PREFIX
    ensemble_template: list[str] = field(default_factory=lambda: list(DEFAULT_ENSEMBLE_TEMPLATE))
    extra: dict[str, Any] = field(default_factory=dict)
    # Where it was loaded from: named in errors and used by save() without a path.
    source: Path | None = field(default=None, compare=False, repr=False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        positive: Iterable[str],
        negative: Iterable[str] = (),
        *,
        ensemble: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
        text_prefix: str = DEFAULT_TEXT_PREFIX,
        ensemble_template: Iterable[str] = DEFAULT_ENSEMBLE_TEMPLATE,
        slots: int = HAILO_SLOTS,
    ) -> PromptSet:
        """A set of not-yet-encoded entries: positives first, then negatives, as Hailo's CLI adds them.

        Empty slots are appended up to ``slots`` entries (never truncating), like Hailo's matcher.
        Fill in the embeddings with :func:`encode_entries`.
        """
        entries = [PromptEntry(t, negative=False, ensemble=ensemble) for t in positive]
        entries += [PromptEntry(t, negative=True, ensemble=ensemble) for t in negative]
        entries += [PromptEntry("") for _ in range(slots - len(entries))]
        return cls(
            entries=entries,
            threshold=threshold,
            text_prefix=text_prefix,
            ensemble_template=list(ensemble_template),
        )

    @classmethod
    def from_texts_json(cls, path: str | os.PathLike[str], **kwargs: Any) -> PromptSet:
        """Read the ``{"positive": [...], "negative": [...]}`` file of Hailo's ``--texts-json``.

        Keyword arguments go to :meth:`from_texts`. Unknown keys are refused so that a misspelt
        ``"negatve"`` does not silently turn negatives into nothing.
        """
        p = Path(path)
        data = _read_json(p)
        if not isinstance(data, dict):
            raise BadPromptFile(
                f"{p}: expected a JSON object with 'positive' and 'negative' lists, found {_json_type(data)}"
            )
        unknown = sorted(set(data) - {"positive", "negative"})
        if unknown:
            raise BadPromptFile(
                f"{p}: unknown key(s) {', '.join(map(repr, unknown))}; "
                "a texts file has only 'positive' and 'negative' lists"
            )
        if not data:
            raise BadPromptFile(f"{p}: no 'positive' or 'negative' list; add at least one list of texts")
        lists: dict[str, list[str]] = {}
        for key in ("positive", "negative"):
            texts = data.get(key, [])
            if not isinstance(texts, list):
                raise BadPromptFile(f"{p}: '{key}' must be a list of texts, found {_json_type(texts)}")
            for i, t in enumerate(texts):
                if not isinstance(t, str) or not t.strip():
                    raise BadPromptFile(f"{p}: {key}[{i}] must be a non-empty text, found {t!r}")
            lists[key] = texts
        ps = cls.from_texts(lists["positive"], lists["negative"], **kwargs)
        ps.source = p
        return ps

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike[str] | None = None) -> PromptSet:
        """Validate and build from parsed JSON; errors name ``source`` when given."""
        src = Path(source) if source is not None else None
        where = str(src) if src is not None else "prompt set"

        def bad(problem: str) -> BadPromptFile:
            return BadPromptFile(f"{where}: {problem}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object with an 'entries' list, found {_json_type(data)}")
        if "entries" not in data:
            raise bad("no 'entries' key; this is not a Hailo CLIP text-embedding file")
        raw_entries = data["entries"]
        if not isinstance(raw_entries, list):
            raise bad(f"'entries' must be a list, found {_json_type(raw_entries)}")

        threshold = data.get("threshold", DEFAULT_THRESHOLD)
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise bad(f"'threshold' must be a finite number, found {threshold!r}")
        text_prefix = data.get("text_prefix", DEFAULT_TEXT_PREFIX)
        if not isinstance(text_prefix, str):
            raise bad(f"'text_prefix' must be a text, found {_json_type(text_prefix)}")
        templates = data.get("ensemble_template", list(DEFAULT_ENSEMBLE_TEMPLATE))
        if not isinstance(templates, list):
            raise bad(f"'ensemble_template' must be a list of texts, found {_json_type(templates)}")
        for i, t in enumerate(templates):
            if not isinstance(t, str) or not _is_template(t):
                raise bad(f"ensemble_template[{i}] must be a text with one '{{}}' placeholder, found {t!r}")

        entries = [_entry_from_dict(e, i, bad) for i, e in enumerate(raw_entries)]
        extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
        if MODEL_KEY in extra and not (isinstance(extra[MODEL_KEY], str) and extra[MODEL_KEY].strip()):
            raise bad(f"'{MODEL_KEY}' must name the model the file was made for, found {extra[MODEL_KEY]!r}")
        return cls(
            entries=entries,
            threshold=threshold,
            text_prefix=text_prefix,
            ensemble_template=list(templates),
            extra=extra,
            source=src,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PromptSet:
        """Read a Hailo CLIP text-embedding JSON file."""
        p = Path(path)
        return cls.from_dict(_read_json(p), source=p)

    # -- saving -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The file's content: Hailo's keys in Hailo's order, then the extra keys that were read."""
        data: dict[str, Any] = {
            "threshold": self.threshold,
            "text_prefix": self.text_prefix,
            "ensemble_template": list(self.ensemble_template),
            "entries": [e.to_dict() for e in self.entries],
        }
        data.update(self.extra)
        return data

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the file atomically (temporary file, then rename) and return its path.

        The layout is ``json.dump``'s default, as Hailo writes it, so a file read and saved
        unchanged comes back byte for byte.
        """
        p = Path(path) if path is not None else self.source
        if p is None:
            raise BadPromptFile("prompt set: no path to save to; pass one to save()")
        try:
            text = json.dumps(self.to_dict(), allow_nan=False)
        except ValueError as e:
            raise BadPromptFile(
                f"{p}: cannot save a NaN or infinite number (threshold or an embedding); fix the value"
            ) from e
        _atomic_write(p, text)
        self.source = p
        return p

    # -- queries ------------------------------------------------------------------------------

    def active_indices(self) -> list[int]:
        """Indices of the entries that take part in matching (text and embedding)."""
        return [i for i, e in enumerate(self.entries) if e.active]

    @property
    def dim(self) -> int | None:
        """The embedding dimension of the active entries, or None when none is active."""
        dims = {e.embedding.shape[0] for e in self.entries if e.text and e.embedding is not None}
        if len(dims) > 1:
            raise BadPromptFile(
                f"{self._where()}: entries have embeddings of different dimensions "
                f"({', '.join(map(str, sorted(dims)))}); {_REENCODE_HINT}"
            )
        return dims.pop() if dims else None

    def made_for(self) -> str | None:
        """The model the embeddings were made with: the recorded ``model``, else Hailo's RN50x4 for a
        640-d file (all of Hailo's are), else None (unknown)."""
        recorded = self.extra.get(MODEL_KEY)
        if isinstance(recorded, str):
            return recorded
        return HAILO_MODEL if self.dim == HAILO_DIM else None

    def add_entries(self, entries: Iterable[PromptEntry]) -> None:
        """Add encoded entries as Hailo's ``update_text_entries`` does: each fills the first empty slot,
        else goes at the end. Entries of another dimension than the set's are refused, nothing added."""
        entries = list(entries)
        dims = {e.embedding.shape[0] for e in entries if e.embedding is not None}
        have = self.dim
        if have is not None and dims - {have}:
            made_for = self.made_for()
            hint = f"encode them with {made_for} (--model {made_for})" if made_for else _REENCODE_HINT
            raise BadPromptFile(
                f"{self._where()}: its prompts are {have}-d but the new ones are "
                f"{', '.join(map(str, sorted(dims - {have})))}-d, so they cannot be matched together; {hint}"
            )
        for entry in entries:
            free = next((i for i, e in enumerate(self.entries) if e.text == ""), None)
            if free is None:
                self.entries.append(entry)
            else:
                self.entries[free] = entry

    def _where(self) -> str:
        return str(self.source) if self.source is not None else "prompt set"


@dataclass(frozen=True)
class MatchResult:
    """The outcome for one image embedding.

    ``probabilities`` maps each active entry's index in ``PromptSet.entries`` to its probability;
    ``passed`` is Hailo's rule: the best entry is not negative and its probability is above the threshold.
    """

    row: int
    probabilities: dict[int, float]
    best_index: int
    text: str
    probability: float
    negative: bool
    passed: bool


# -- encoding ---------------------------------------------------------------------------------


def entry_texts_for_encoding(entry: PromptEntry, prompt_set: PromptSet) -> list[str]:
    """The strings to encode for ``entry``: prefix + text, or the text in each ensemble template."""
    if entry.ensemble:
        return [t.format(entry.text) for t in prompt_set.ensemble_template]
    return [prompt_set.text_prefix + entry.text]


def combine_embeddings(entry: PromptEntry, embeddings: np.ndarray) -> np.ndarray:
    """One float32 embedding from the encoded rows of :func:`entry_texts_for_encoding`.

    Hailo takes the mean of the L2-normalised rows and does not normalise the mean again, so an
    ensemble embedding is slightly shorter than unit length; we keep that so probabilities agree
    with Hailo's app. A single row (no ensemble) comes back unchanged apart from normalisation.
    """
    rows = np.asarray(embeddings, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"expected a (n, dim) array of embeddings, got shape {np.shape(embeddings)}")
    if not entry.ensemble and rows.shape[0] != 1:
        raise ValueError(f"entry {entry.text!r} is not an ensemble but got {rows.shape[0]} embeddings")
    return average_templates(rows, rows.shape[0], renormalise=False)[0]


def encode_entries(
    prompt_set: PromptSet,
    encode_texts: Callable[[list[str]], np.ndarray],
    *,
    only_missing: bool = False,
) -> list[int]:
    """Fill in the embedding of every entry with text, in one call of ``encode_texts``.

    ``encode_texts`` returns L2-normalised float32 rows, one per text. Empty slots are left as they
    are. With ``only_missing`` only entries without an embedding are encoded. Returns the indices
    of the entries encoded.
    """
    todo = [i for i, e in enumerate(prompt_set.entries) if e.text and not (only_missing and e.embedding is not None)]
    if not todo:
        return []
    spans: list[tuple[int, int]] = []
    texts: list[str] = []
    for i in todo:
        parts = entry_texts_for_encoding(prompt_set.entries[i], prompt_set)
        spans.append((len(texts), len(texts) + len(parts)))
        texts += parts
    rows = np.asarray(encode_texts(texts))
    if rows.ndim != 2 or rows.shape[0] != len(texts):
        raise ValueError(f"encode_texts returned shape {rows.shape} for {len(texts)} texts")
    for i, (a, b) in zip(todo, spans, strict=True):
        prompt_set.entries[i].embedding = combine_embeddings(prompt_set.entries[i], rows[a:b]).astype(np.float64)
    return todo


# -- matching ---------------------------------------------------------------------------------


def prompt_bank(prompt_set: PromptSet, model: Any = None) -> tuple[LabelBank, list[int]]:
    """The active entries as a label bank, and each bank row's index in ``prompt_set.entries``.

    The rows are the entries' embeddings as stored (Hailo's ensemble means are not renormalised), in
    float64 as the file holds them; they score at ``model``'s family's shared scale (None: CLIP's 100,
    as Hailo's app multiplies the dot products by 100 before its softmax).
    """
    indices = prompt_set.active_indices()
    if not indices:
        raise BadPromptFile(
            f"{prompt_set._where()}: no entry has both a text and an embedding; "
            "add texts and encode them (clipworks embed texts ... --model ...)"
        )
    prompt_set.dim  # noqa: B018 -- refuses entries of mixed dimensions, naming the file
    active = [e for e in prompt_set.entries if e.active and e.embedding is not None]  # None test for mypy
    matrix = np.stack([e.embedding for e in active])
    return LabelBank([e.text for e in active], matrix, Scoring.of(model).shared()), indices


def match_probabilities(
    image_embeddings: np.ndarray, prompt_set: PromptSet, model: Any = None
) -> tuple[np.ndarray, list[int]]:
    """Hailo's probabilities for every image and active entry.

    Returns ``(probs, indices)``: ``probs`` is (N, K) float64, for a CLIP model (or None) the row-wise
    softmax of ``100 * normalised_image . entry_embedding``; ``indices[k]`` is entry k's index in the set.
    An all-zero image row gets equal probabilities, not NaNs. A 1-D image embedding counts as one row.
    """
    images = np.asarray(image_embeddings, dtype=np.float64)
    if images.ndim == 1:
        images = images[None, :]
    if images.ndim != 2:
        raise ValueError(f"expected image embeddings of shape (n, dim) or (dim,), got {images.shape}")
    bank, indices = prompt_bank(prompt_set, model)
    if bank.matrix.shape[1] != images.shape[1]:
        raise BadPromptFile(
            f"{prompt_set._where()}: prompt embeddings have dimension {prompt_set.dim} but the image embeddings "
            f"have dimension {images.shape[1]}; {_REENCODE_HINT}"
        )
    return bank.probabilities(images), indices


def match(image_embeddings: np.ndarray, prompt_set: PromptSet, model: Any = None) -> list[MatchResult]:
    """Match each image embedding against the prompt set with Hailo's rules; one result per row.

    ``model``: whose family turns cosines into probabilities (None: CLIP's, as Hailo's app)."""
    probs, indices = match_probabilities(image_embeddings, prompt_set, model)
    best = probs.argmax(axis=1)
    results = []
    for row, (p, k) in enumerate(zip(probs, best, strict=True)):
        entry = prompt_set.entries[indices[k]]
        prob = float(p[k])
        results.append(
            MatchResult(
                row=row,
                probabilities=dict(zip(indices, p.tolist(), strict=True)),
                best_index=indices[k],
                text=entry.text,
                probability=prob,
                negative=entry.negative,
                passed=(not entry.negative) and prob > prompt_set.threshold,
            )
        )
    return results


# -- helpers ----------------------------------------------------------------------------------


def _entry_from_dict(raw: Any, i: int, bad: Callable[[str], BadPromptFile]) -> PromptEntry:
    if not isinstance(raw, dict):
        raise bad(f"entries[{i}] must be an object, found {_json_type(raw)}")
    if "text" not in raw:
        raise bad(f"entries[{i}] has no 'text' key")
    text = raw["text"]
    if not isinstance(text, str):
        raise bad(f"entries[{i}].text must be a text, found {_json_type(text)}")
    emb = raw.get("embedding", [])
    if not isinstance(emb, list):
        raise bad(f"entries[{i}].embedding must be a list of numbers, found {_json_type(emb)}")
    for j, x in enumerate(emb):
        if not _is_number(x):
            raise bad(f"entries[{i}].embedding[{j}] must be a number, found {x!r}; {_REENCODE_HINT}")
    array = np.array(emb, dtype=np.float64)
    if not np.isfinite(array).all():
        j = int(np.flatnonzero(~np.isfinite(array))[0])
        raise bad(f"entries[{i}].embedding[{j}] is {emb[j]!r}, not a finite number; {_REENCODE_HINT}")
    flags = {}
    for key in ("negative", "ensemble"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise bad(f"entries[{i}].{key} must be true or false, found {value!r}")
        flags[key] = value
    extra = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    return PromptEntry(text, array if array.size else None, extra=extra, **flags)


def _read_json(path: Path) -> Any:
    raw = read_user_text(path, "a JSON file", BadPromptFile)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadPromptFile(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


def _atomic_write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise BadPromptFile(f"{path}: cannot write ({e.strerror}); check that the folder exists and is writable") from e


def _is_number(x: Any) -> bool:
    # bool is an int subclass, but true/false in an embedding is a broken file, not 1.0/0.0.
    return type(x) is float or type(x) is int


def _is_template(t: str) -> bool:
    try:
        return "\0" in t.format("\0")
    except (IndexError, KeyError, ValueError):
        return False


def _json_type(x: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a text", bool: "a boolean", type(None): "null"}
    return names.get(type(x), "a number" if isinstance(x, int | float) else type(x).__name__)
