"""A Hugging Face ``tokenizer.json`` used as its file defines it, padded to a fixed length: SigLIP, XLM-R, NLLB.

Unlike CLIP's BPE (``clipworks.tokenizer``), whose ids we rebuild the way open_clip's Python tokenizer makes
them, these text towers were trained on whatever their Hugging Face tokenizer gives: the file's own
normaliser, pre-tokenizer, model and post-processor (start and end tokens) are the definition. What the file
does not say comes from ``tokenizer_config.json`` beside it, as ``transformers`` and Immich read it: the pad
token, and which side is padded and cut.

open_clip's ``HFTokenizer`` adds two things in Python, which :class:`FileTokenizer` offers as options: a text
cleaning step before tokenizing (``clean``: ``canonicalize`` for SigLIP, ``whitespace`` by default) and
``strip_sep_token`` (the separator id becomes 0, for BERT-style towers). :meth:`FileTokenizer.for_open_clip`
reads both from an open_clip model config; Immich's runtime uses neither, so ``from_dir`` defaults to none.
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from clipworks.errors import BadBundle, UsageError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

Side = Literal["left", "right"]
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """open_clip's ``basic_clean``: ftfy, HTML unescaped twice, outer whitespace stripped."""
    # ftfy costs ~30 µs a string and is the identity on printable ASCII without entities, i.e. most prompts.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def clean_whitespace(text: str) -> str:
    """open_clip's ``whitespace`` cleaning (``HFTokenizer``'s default): basic clean, runs of whitespace as one space."""
    return " ".join(basic_clean(text).split())


def clean_lower(text: str) -> str:
    """open_clip's ``lower`` cleaning: whitespace cleaning, then lowercase."""
    return clean_whitespace(text).lower()


def clean_canonicalize(text: str) -> str:
    """open_clip's ``canonicalize`` cleaning (SigLIP; big_vision's prompt canonicaliser): basic clean, ``_`` as
    a space, ASCII punctuation removed, lowercase, whitespace collapsed."""
    text = basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


# open_clip's ``get_clean_fn`` names, so a model config's ``tokenizer_kwargs.clean`` picks the same step.
CLEANERS: dict[str, Callable[[str], str]] = {
    "whitespace": clean_whitespace,
    "lower": clean_lower,
    "canonicalize": clean_canonicalize,
}


def cleaner(name: str, source: str = "the model config") -> Callable[[str], str]:
    """The cleaning function open_clip calls ``name``; ``BadBundle`` naming ``source`` if there is none."""
    try:
        return CLEANERS[name]
    except KeyError:
        known = ", ".join(sorted(CLEANERS))
        raise BadBundle(
            f"{source} asks for text cleaning {name!r}, which this clipworks does not know ({known}): "
            "upgrade clipworks or re-export the model"
        ) from None


class FileTokenizer:
    """Token rows ``(B, L)`` int64 from a ``tokenizer.json``, cut to ``context_length`` and padded with ``pad_id``.

    Satisfies ``clipworks.models.family.TextTokenizer``. Rows are cut the way ``tokenizers`` truncates (the
    post-processor's start and end tokens stay), on ``truncation_side``, and padded on ``padding_side``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        context_length: int,
        pad_token: str,
        *,
        clean: Callable[[str], str] | None = None,
        padding_side: Side = "right",
        truncation_side: Side = "right",
        sep_token: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        """Wrap (and reconfigure) a loaded tokenizer. ``sep_token``: written as 0 in every row (open_clip's
        ``strip_sep_token``). ``source`` names the file in error messages."""
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise BadBundle(f"{source} has no token {pad_token!r}, the pad token its config names; pull it again")
        specials = tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
        if context_length <= specials:
            raise UsageError(
                f"context_length must be more than the {specials} special tokens {source} adds, not {context_length}"
            )
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise BadBundle(f"{source}: {name} must be 'left' or 'right', not {side!r}")
        self.sep_id: int | None = None
        if sep_token is not None:
            self.sep_id = tokenizer.token_to_id(sep_token)
            if self.sep_id is None:
                raise BadBundle(f"{source} has no token {sep_token!r}, the separator its config names")
        # Padding is ours (its length varies per call, and a shared tokenizer must not change state per call);
        # truncation is the library's, because only it knows how many tokens the post-processor adds.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=context_length, direction=truncation_side)
        self._tokenizer = tokenizer
        self._clean = clean
        self.context_length = context_length
        self.pad_token = pad_token
        self.pad_id: int = pad_id
        self.padding_side: Side = padding_side
        self.truncation_side: Side = truncation_side

    @classmethod
    def from_dir(
        cls,
        textual_dir: str | Path,
        context_length: int,
        *,
        clean: str | Callable[[str], str] | None = None,
        strip_sep_token: bool = False,
    ) -> FileTokenizer:
        """Load ``tokenizer.json`` with the pad token and sides from ``tokenizer_config.json`` (or
        ``special_tokens_map.json``, or the file's own padding) in ``textual_dir``; ``BadBundle`` naming the
        file that is missing or broken. ``clean`` is a function or one of open_clip's names (``CLEANERS``)."""
        textual_dir = Path(textual_dir)
        path = textual_dir / TOKENIZER_FILE
        if not path.is_file():
            raise BadBundle(f"{path} is missing: re-export the model (`clipworks export`) or pull it again")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed files
            raise BadBundle(f"{path} is not a valid tokenizer file ({e}); re-export the model or pull it again") from e
        config = _read_optional_json(textual_dir / CONFIG_FILE)
        special = _read_optional_json(textual_dir / SPECIAL_TOKENS_FILE)
        pad_token = _token(config.get("pad_token")) or _token(special.get("pad_token")) or _file_pad_token(tokenizer)
        if pad_token is None:
            raise BadBundle(
                f"{textual_dir} names no pad token (pad_token in {CONFIG_FILE} or {SPECIAL_TOKENS_FILE}); "
                "re-export the model or pull it again"
            )
        sep_token = None
        if strip_sep_token:
            sep_token = _token(config.get("sep_token")) or _token(special.get("sep_token"))
            if sep_token is None:
                raise BadBundle(f"{textual_dir / CONFIG_FILE} names no sep_token, which strip_sep_token needs")
        clean_fn = cleaner(clean, str(textual_dir)) if isinstance(clean, str) else clean
        return cls(
            tokenizer,
            context_length,
            pad_token,
            clean=clean_fn,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            sep_token=sep_token,
            source=str(path),
        )

    @classmethod
    def for_open_clip(cls, textual_dir: str | Path, model_config: dict[str, Any]) -> FileTokenizer:
        """The tokenizer open_clip's ``HFTokenizer`` makes for a model config: its context length, and the
        cleaning and ``strip_sep_token`` of ``text_cfg.tokenizer_kwargs`` (``whitespace`` cleaning by default)."""
        text_cfg = model_config.get("text_cfg", {})
        options = text_cfg.get("tokenizer_kwargs", {}) or {}
        return cls.from_dir(
            textual_dir,
            int(text_cfg.get("context_length", 77)),
            clean=options.get("clean", "whitespace"),
            strip_sep_token=bool(options.get("strip_sep_token", False)),
        )

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> np.ndarray:
        """Token ids ``(B, L)`` int64 as open_clip's ``HFTokenizer`` gives them: ``L`` is ``pad_to``, or
        ``context_length`` when None (these towers see whole rows, padding included)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [encoding.ids for encoding in self._encodings(texts)]
        width = self.context_length if pad_to is None else pad_to
        longest = max(map(len, rows), default=0)
        if width < longest:
            raise UsageError(f"pad_to={width} is shorter than the longest prompt ({longest} tokens)")
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        if not rows:
            return out
        sizes = np.fromiter(map(len, rows), dtype=np.intp, count=len(rows))
        columns = np.arange(width)[None, :]
        # One vectorised fill: a numpy assignment per row costs more than the tokenizing itself.
        filled = columns < sizes[:, None] if self.padding_side == "right" else columns >= (width - sizes)[:, None]
        out[filled] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(sizes.sum()))
        if self.sep_id is not None:
            out[out == self.sep_id] = 0  # open_clip's strip_sep_token writes 0, whatever the pad id is
        return out

    def too_long(self, texts: Sequence[str]) -> list[str]:
        """The texts ``encode`` cuts: more than ``context_length`` tokens with the file's special tokens."""
        return [t for t, e in zip(texts, self._encodings(texts), strict=True) if e.overflowing]

    def _encodings(self, texts: Sequence[str]) -> list[Any]:
        cleaned = [self._clean(t) for t in texts] if self._clean else list(texts)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read.
        encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return encode_batch(cleaned, add_special_tokens=True)


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadBundle(f"{path} is not valid JSON ({e}); re-export the model or pull it again") from e
    if not isinstance(data, dict):
        raise BadBundle(f"{path} should hold a JSON object; re-export the model or pull it again")
    return data


def _token(value: Any) -> str | None:
    """A special token as ``transformers`` saves it: a string, or an AddedToken object with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _file_pad_token(tokenizer: Tokenizer) -> str | None:
    padding = tokenizer.padding
    return padding.get("pad_token") if padding else None
