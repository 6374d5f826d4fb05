"""CLIP's BPE tokenizer through the Hugging Face ``tokenizers`` library, id for id with open_clip.

The export side (``clipworks.export.tokenizer_files``) writes ``tokenizer.json`` (+ ``tokenizer_config.json``,
``special_tokens_map.json``) in the format of Hugging Face's ``openai/clip-vit-base-patch32`` files, so Immich's
runtime can load our bundles and we can load Immich's. The runtime side (:class:`ClipTokenizer`) takes only the
vocabulary and merges from that file and does the rest the way open_clip's ``SimpleTokenizer`` does, because the
file's own normaliser (NFC, ``\\s+`` collapse, per-character lowercase) and special-token matching differ from
open_clip in corner cases.

The one known difference from open_clip: characters assigned in a newer Unicode version than the one
Python's and the ``tokenizers`` regex engine's (Oniguruma) tables know, which the ``regex`` module that
open_clip uses may already class as letters (Unicode 16/17 additions such as U+0C5C or CJK Extension J,
U+323B0..U+33479). Both answers depend on the installed library versions. Every codepoint assigned in
Python's Unicode tables gives open_clip's ids (tests/test_tokenizer.py sweeps them).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from clipworks.errors import BadBundle, UsageError

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# open_clip names its special tokens differently from OpenAI and Hugging Face; the ids are the same.
OPEN_CLIP_SOT = "<start_of_text>"
OPEN_CLIP_EOT = "<end_of_text>"

# open_clip's word pattern without its special-token alternatives (handled in `_encode_with_specials`).
# open_clip compiles it with IGNORECASE, which in lowercased text only adds "'ſ" (long s) as a contraction;
# spelling that out is ~40% faster than Oniguruma's (?i).
_WORDS = r"""'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Case-insensitive like open_clip's pattern, which also takes "<ſtart_of_text>" (but then BPE-encodes it).
_SPECIAL = re.compile(f"{re.escape(OPEN_CLIP_SOT)}|{re.escape(OPEN_CLIP_EOT)}", re.IGNORECASE)


def clean_text(text: str) -> str:
    """open_clip's default ("lower") cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lowercase."""
    # ftfy costs ~30 µs a string and is the identity on printable ASCII without entities, i.e. most prompts.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE tokenizer with open_clip's ids; rows are padded with 0 only to the longest in the batch."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77, source: str = "tokenizer") -> None:
        """Wrap (and reconfigure) a loaded CLIP ``Tokenizer``; ``source`` names it in error messages."""
        sot = _first_id(tokenizer, SOT, OPEN_CLIP_SOT)
        eot = _first_id(tokenizer, EOT, OPEN_CLIP_EOT)
        model = tokenizer.model
        is_clip_bpe = isinstance(model, models.BPE) and model.end_of_word_suffix == "</w>"
        if sot is None or eot is None or not is_clip_bpe:
            raise BadBundle(
                f"{source} is not a CLIP BPE tokenizer (needs {SOT}, {EOT} and end_of_word_suffix '</w>'): "
                "re-export the model with `clipworks export` or pull it again"
            )
        if context_length < 2:
            raise UsageError(f"context_length must be at least 2 (start and end token), not {context_length}")
        # Take only vocabulary and merges from the file: open_clip's cleaning runs in Python (`clean_text`),
        # its word split replaces the file's, and "<|endoftext|>" typed by a user is text, as in open_clip.
        tokenizer.normalizer = normalizers.Sequence([])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self._split = pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True)
        self._bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.context_length = context_length
        self.pad_id = 0  # open_clip pads with 0; rows are cut to the longest prompt, so it is rarely sent
        self.sot_id: int = sot
        self.eot_id: int = eot

    @classmethod
    def from_dir(cls, textual_dir: Path, context_length: int = 77) -> ClipTokenizer:
        """Load ``textual_dir/tokenizer.json`` (ours or a Hugging Face / Immich CLIP one); ``BadBundle`` if
        it is missing or not a CLIP BPE tokenizer."""
        path = Path(textual_dir) / "tokenizer.json"
        if not path.is_file():
            raise BadBundle(f"{path} is missing: re-export the model (`clipworks export`) or pull it again")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed files
            raise BadBundle(
                f"{path} is not a valid tokenizer file ({e}): re-export the model with `clipworks export` "
                "or pull it again"
            ) from e
        return cls(tokenizer, context_length, source=str(path))

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> np.ndarray:
        """Token ids ``(B, L)`` int64: start, text, end, then 0s, as ``open_clip.tokenize`` gives them.

        ``L`` is the longest row in the batch (CLIP's causal mask and end-token pooling make further padding
        irrelevant), or ``pad_to`` for graphs with a fixed text axis. Rows longer than ``context_length`` are
        cut to it with the end token kept last.
        """
        if isinstance(texts, str):
            texts = [texts]
        bodies = self._bodies(texts)
        # open_clip keeps the first context_length - 1 tokens and overwrites the last with the end token.
        keep = self.context_length - 2
        bodies = [b[:keep] if len(b) > keep else b for b in bodies]
        sizes = np.fromiter(map(len, bodies), dtype=np.intp, count=len(bodies))
        longest = int(sizes.max()) + 2 if len(bodies) else 0
        if pad_to is not None and pad_to < longest:
            raise UsageError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        out = np.zeros((len(bodies), longest if pad_to is None else pad_to), dtype=np.int64)
        if not bodies:
            return out
        # One vectorised fill: a numpy assignment per row cost more than the tokenizing itself.
        out[:, 0] = self.sot_id
        in_body = np.arange(1, out.shape[1])[None, :] <= sizes[:, None]
        out[:, 1:][in_body] = np.fromiter(chain.from_iterable(bodies), dtype=np.int64, count=int(sizes.sum()))
        out[np.arange(len(bodies)), sizes + 1] = self.eot_id
        return out

    def too_long(self, texts: Sequence[str]) -> list[str]:
        """The texts ``encode`` cuts: more than ``context_length`` tokens with the start and end tokens.

        open_clip cuts them silently, OpenAI's ``clip.tokenize`` (video_features, Hailo) raises instead;
        callers warn with these names so a cut prompt is never a surprise.
        """
        bodies = self._bodies(texts)
        return [t for t, b in zip(texts, bodies, strict=True) if len(b) + 2 > self.context_length]

    def _bodies(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids without the start and end tokens, uncut."""
        cleaned = [_drop_unmatched(clean_text(t)) for t in texts]
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read: 20% faster.
        encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        bodies = [e.ids for e in encode_batch(cleaned, add_special_tokens=False)]
        for i, text in enumerate(cleaned):
            if "_of_text>" in text and _SPECIAL.search(text):  # substring test first: it is cheaper
                bodies[i] = self._encode_with_specials(text)
        return bodies

    def _encode_with_specials(self, text: str) -> list[int]:
        """Ids for cleaned text in which open_clip's pattern may find "<start_of_text>" or "<end_of_text>"."""
        ids: list[int] = []
        while match := self._next_special(text):
            ids += self._encode_plain(text[: match.start()])
            word = match.group()
            if word in (OPEN_CLIP_SOT, OPEN_CLIP_EOT):
                ids.append(self.sot_id if word == OPEN_CLIP_SOT else self.eot_id)
            else:  # a case-folded spelling ("<ſtart_of_text>") misses open_clip's special-token cache
                byte_word = self._bytes.pre_tokenize_str(word)[0][0]
                ids += [token.id for token in self._tokenizer.model.tokenize(byte_word)]
            text = text[match.end() :]
        return ids + self._encode_plain(text)

    def _next_special(self, text: str) -> re.Match[str] | None:
        # open_clip's pattern tries its special tokens first wherever a word may start. Up to the first one
        # found, those places are where our words start ("a<end_of_text>" has one, "!<end_of_text>" none).
        for _, (start, _end) in self._split.pre_tokenize_str(text):
            match = _SPECIAL.match(text, start)
            if match:
                return match
        return None

    def _encode_plain(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _drop_unmatched(text: str) -> str:
    # open_clip's IGNORECASE pattern matches U+0345 nowhere (it case-folds to a letter, so no character class
    # takes it): the character drops out and splits the word around it, as a space does.
    return text.replace("\u0345", " ") if "\u0345" in text else text


def _first_id(tokenizer: Tokenizer, *names: str) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None
