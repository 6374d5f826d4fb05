"""Preprocessing profiles: whose pixels and token ids a model's vectors must reproduce.

A profile is chosen where a model is loaded (``clipworks.load(..., profile="immich")``) and applies to both
towers; the graphs, sessions and normalisation stay the bundle's.

- ``open_clip`` (default): open_clip's eval transform (EXIF-upright, rounded crop) and its tokenizer (ftfy,
  HTML unescaping, lowercase, rows padded with 0). Vectors match open_clip's own.
- ``immich``: what Immich's machine-learning service computes for the same bundle. Images go through
  ``clipworks.imaging.preprocess_immich``; texts through the bundle's ``tokenizer.json`` exactly as Immich's
  ``OpenClipTextualEncoder`` uses it: the file's own normaliser and post-processor, whitespace collapsed (and
  punctuation dropped, lowercased, for configs whose ``tokenizer_kwargs.clean`` is ``canonicalize``), every
  row padded to the context length with ``tokenizer_config.json``'s ``pad_token`` (CLIP's end token, 49407,
  where open_clip pads with 0) and cut to it. Serve vectors *into* an Immich database with this one.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipworks.errors import UsageError
from clipworks.imaging import PixelProfile

if TYPE_CHECKING:
    from clipworks.file_tokenizer import FileTokenizer
    from clipworks.models.bundle import Bundle
    from clipworks.models.family import Family, TextTokenizer

DEFAULT_PROFILE: PixelProfile = "open_clip"


@dataclass(frozen=True)
class Profile:
    """One profile's text side (its image side is ``PreprocessConfig.profile``, read by ``imaging.decode``)."""

    name: PixelProfile
    summary: str
    # Whether token rows may be cut to the longest prompt where the family allows it. Immich always sends
    # whole rows, and padding that is the end token would be mistaken for the end of every prompt.
    trims_text_padding: bool

    def tokenizer(self, bundle: Bundle, family: Family) -> TextTokenizer:
        if self.name == "immich":
            return immich_tokenizer(bundle)
        return family.tokenizer(bundle)


PROFILES: dict[str, Profile] = {
    "open_clip": Profile("open_clip", "open_clip's eval transform and tokenizer (EXIF-upright, 0-padded)", True),
    "immich": Profile("immich", "Immich's ML service: its crop, no EXIF rotation, tokenizer.json as shipped", False),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown preprocessing profile {name!r}; use one of {', '.join(PROFILES)}") from None


# -- Immich's text path -----------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def immich_clean_text(text: str, canonicalize: bool = False) -> str:
    """Immich's ``clean_text``: whitespace collapsed; with ``canonicalize`` (SigLIP configs) ASCII punctuation
    removed and lowercased. No ftfy and no HTML unescaping: ``&amp;`` stays five characters. Idempotent.
    (Not ``file_tokenizer.clean_canonicalize``: open_clip's also unescapes HTML and turns ``_`` into a space.)"""
    text = " ".join(text.split())
    return text.translate(_PUNCTUATION).lower() if canonicalize else text


def immich_tokenizer(bundle: Bundle) -> FileTokenizer:
    """The bundle's ``tokenizer.json`` as Immich's ``OpenClipTextualEncoder`` configures it: the file's own
    normaliser and post-processor, Immich's cleaning, rows of exactly ``context_length`` padded on the right
    with ``tokenizer_config.json``'s ``pad_token`` and cut on the right (Immich ignores the config's sides)."""
    # Imported here: a host that only matches images against a prompt file never loads a tokenizer.
    from tokenizers import Tokenizer

    from clipworks.file_tokenizer import FileTokenizer

    text_cfg: dict[str, Any] = bundle.config.get("text_cfg", {})
    options = text_cfg.get("tokenizer_kwargs") or {}
    canonicalize = isinstance(options, dict) and options.get("clean") == "canonicalize"
    clean = functools.partial(immich_clean_text, canonicalize=canonicalize)
    context_length = int(text_cfg.get("context_length", 77))
    tokenizer = FileTokenizer.from_dir(bundle.textual_dir, context_length, clean=clean)
    if (tokenizer.padding_side, tokenizer.truncation_side) != ("right", "right"):
        path = str(bundle.textual_dir / "tokenizer.json")  # read and checked by from_dir just now
        tokenizer = FileTokenizer(Tokenizer.from_file(path), context_length, tokenizer.pad_token, clean=clean,
                                  source=path)  # fmt: skip
    return tokenizer


# Immich's Weblate locale -> FLORES-200 code table for NLLB text towers, data copied from immich-app/immich
# ``machine-learning/immich_ml/models/constants.py`` (WEBLATE_TO_FLORES200) at 03112cf.
WEBLATE_TO_FLORES200: dict[str, str] = {
    "af": "afr_Latn", "ar": "arb_Arab", "az": "azj_Latn", "be": "bel_Cyrl", "bg": "bul_Cyrl", "ca": "cat_Latn",
    "cs": "ces_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "es": "spa_Latn",
    "et": "est_Latn", "fa": "pes_Arab", "fi": "fin_Latn", "fr": "fra_Latn", "he": "heb_Hebr", "hi": "hin_Deva",
    "hr": "hrv_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn", "it": "ita_Latn", "ja": "jpn_Hira",
    "kmr": "kmr_Latn", "ko": "kor_Hang", "lb": "ltz_Latn", "lt": "lit_Latn", "lv": "lav_Latn", "mfa": "zsm_Latn",
    "mk": "mkd_Cyrl", "mn": "khk_Cyrl", "mr": "mar_Deva", "ms": "zsm_Latn", "nb-NO": "nob_Latn", "nn": "nno_Latn",
    "nl": "nld_Latn", "pl": "pol_Latn", "pt-BR": "por_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl",
    "sk": "slk_Latn", "sl": "slv_Latn", "sr-Cyrl": "srp_Cyrl", "sv": "swe_Latn", "ta": "tam_Taml", "te": "tel_Telu",
    "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl", "ur": "urd_Arab", "vi": "vie_Latn", "zh-CN": "zho_Hans",
    "zh-Hans": "zho_Hans", "zh-TW": "zho_Hant",
}  # fmt: skip


def flores_code(language: str) -> str:
    """The NLLB language code Immich prefixes to a query: the locale, else its language, else English."""
    return WEBLATE_TO_FLORES200.get(language) or WEBLATE_TO_FLORES200.get(language.split("-")[0]) or "eng_Latn"


def immich_query(text: str, language: str | None, nllb: bool) -> str:
    """The text Immich tokenizes for a search: whitespace collapsed, then (NLLB towers given a language)
    prefixed with the FLORES code, no space between. ``immich_tokenizer`` cleans again, which changes nothing
    (NLLB configs do not canonicalize, which would also strip the code's underscore)."""
    text = immich_clean_text(text)
    return f"{flores_code(language)}{text}" if nllb and language is not None else text
