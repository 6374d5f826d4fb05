"""Immich compatibility: the "immich" preprocessing profile and Immich's machine-learning API.

The reference side re-implements Immich's own steps independently (immich_ml's decode_pil / resize_pil /
crop_pil / normalize, and OpenClipTextualEncoder's use of tokenizer.json) with plain Pillow, numpy, tokenizers
and ONNX Runtime, on an Immich-layout bundle: no clipworks.json, graphs that L2-normalise inside and take
int32 token ids, as Immich's exporter writes them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from tokenizers import Tokenizer

import clipworks
from clipworks.errors import BadBundle, UsageError
from clipworks.file_tokenizer import FileTokenizer
from clipworks.profiles import PROFILES, flores_code, immich_query
from test_imaging import IMMICH_CASES, immich_reference_pixels

HARD_TEXTS = [
    "a photo of a dog",
    "Tom &amp; Jerry &lt;3",  # Immich does not unescape HTML: the entity's characters are tokens
    "  café   au\tlait\n",  # whitespace collapsed, accents kept (the file's NFC normaliser)
    "Straße in München, 東京の夜景 🌃",
    "it's the DOG's toy!!!",
    "",
    "a very long prompt about a cat on a sofa " * 12,  # cut to 77 tokens, end token kept
]


def make_immich_bundle(vit_bundle: Path, dest: Path) -> Path:
    """Our tiny bundle in Immich's layout: no clipworks.json, fp32 only, graphs that normalise their output
    (Immich exports ``encode_image(..., normalize=True)``) and take int32 text."""
    shutil.copytree(vit_bundle, dest, ignore=shutil.ignore_patterns("clipworks.json", "int8", "fp16"))
    for tower in ("visual", "textual"):
        path = dest / tower / "model.onnx"
        model = onnx.load(str(path))
        graph = model.graph
        raw = graph.output[0].name
        graph.node.append(onnx.helper.make_node("LpNormalization", [raw], ["normalized"], axis=-1, p=2))
        graph.output[0].name = "normalized"
        assert tower == "visual" or graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
        onnx.save(model, str(path))
    return dest


@pytest.fixture(scope="module")
def immich_bundle(vit_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_immich_bundle(vit_bundle, tmp_path_factory.mktemp("immich") / "ViT-B-32__openai")


def immich_reference_tokens(bundle: Path, text: str) -> np.ndarray:
    """OpenClipTextualEncoder._load_tokenizer + tokenize, independently: (1, context_length) int32."""
    text_cfg = json.loads((bundle / "config.json").read_text())["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    pad_token = json.loads((bundle / "textual" / "tokenizer_config.json").read_text())["pad_token"]
    tokenizer = Tokenizer.from_file((bundle / "textual" / "tokenizer.json").as_posix())
    tokenizer.enable_padding(length=context_length, pad_token=pad_token, pad_id=tokenizer.token_to_id(pad_token))
    tokenizer.enable_truncation(max_length=context_length)
    return np.array([tokenizer.encode(" ".join(text.split())).ids], dtype=np.int32)


class ImmichReference:
    """Immich's service for one bundle: its preprocessing and a direct ONNX Runtime run, one input at a time."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.cfg = json.loads((bundle / "visual" / "preprocess_cfg.json").read_text())
        self.visual = ort.InferenceSession(str(bundle / "visual" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.textual = ort.InferenceSession(str(bundle / "textual" / "model.onnx"), providers=["CPUExecutionProvider"])

    def image(self, data: bytes) -> np.ndarray:
        return self.visual.run(None, {"image": immich_reference_pixels(data, self.cfg)})[0][0]

    def text(self, text: str) -> np.ndarray:
        return self.textual.run(None, {"text": immich_reference_tokens(self.bundle, text)})[0][0]


@pytest.fixture(scope="module")
def reference(immich_bundle: Path) -> ImmichReference:
    return ImmichReference(immich_bundle)


# -- (A) the "immich" profile -----------------------------------------------------------------------------


def test_profiles_are_the_ones_imaging_knows() -> None:
    assert tuple(PROFILES) == clipworks.imaging.PIXEL_PROFILES


def test_immich_tokenizer_gives_immichs_ids(immich_bundle: Path) -> None:
    model = clipworks.load(immich_bundle, profile="immich")
    ours = model.tokenizer.encode(HARD_TEXTS)
    expected = np.concatenate([immich_reference_tokens(immich_bundle, t) for t in HARD_TEXTS])
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape == (len(HARD_TEXTS), 77) and model.tokenizer.pad_id == 49407
    assert model.tokenizer.too_long(HARD_TEXTS) == [HARD_TEXTS[-1]]
    # The default profile is open_clip's: 0 padding, HTML unescaped, so other ids for the same texts.
    default = clipworks.load(immich_bundle).tokenizer.encode(HARD_TEXTS, pad_to=77)
    assert default[0, -1] == 0 and ours[0, -1] == 49407
    assert not np.array_equal(default[1], ours[1])  # "&amp;" stays five characters in Immich's ids


def test_immich_profile_embeddings_equal_immichs_service(immich_bundle: Path, reference: ImmichReference) -> None:
    model = clipworks.load(immich_bundle, profile="immich")
    blobs = [make() for make in IMMICH_CASES.values()]
    np.testing.assert_allclose(model.encode_images(blobs), np.stack([reference.image(b) for b in blobs]), atol=1e-6)
    np.testing.assert_allclose(
        model.encode_texts(HARD_TEXTS), np.stack([reference.text(t) for t in HARD_TEXTS]), atol=1e-6
    )
    # The open_clip profile really is another answer for these inputs (crop offset, EXIF, HTML, padding).
    default = clipworks.load(immich_bundle)
    assert np.abs(default.encode_images(blobs[:1]) - model.encode_images(blobs[:1])).max() > 1e-4
    assert np.abs(default.encode_texts(HARD_TEXTS[1:2]) - model.encode_texts(HARD_TEXTS[1:2])).max() > 1e-4


def test_unknown_profile_is_refused(immich_bundle: Path) -> None:
    with pytest.raises(UsageError, match="unknown preprocessing profile 'immich-v2'; use one of open_clip, immich"):
        clipworks.load(immich_bundle, profile="immich-v2")


def test_immich_tokenizer_reads_canonicalize_from_the_config(immich_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(immich_bundle, tmp_path / "siglip-like"))
    config = json.loads((bundle / "config.json").read_text())
    config["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    (bundle / "config.json").write_text(json.dumps(config))
    # Immich pads and cuts on the right whatever tokenizer_config.json says (its enable_padding defaults).
    tokenizer_config = json.loads((bundle / "textual" / "tokenizer_config.json").read_text())
    tokenizer_config.update(padding_side="left", truncation_side="left")
    (bundle / "textual" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = clipworks.load(bundle, profile="immich").tokenizer
    assert isinstance(tokenizer, FileTokenizer)
    np.testing.assert_array_equal(tokenizer.encode(["It's a DOG!"]), tokenizer.encode(["its a dog"]))
    np.testing.assert_array_equal(tokenizer.encode(["its a dog"]), immich_reference_tokens(bundle, "its a dog"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "tokenizer_config.json").write_text("{oops"), "is not valid JSON"),
        (lambda d: (d / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}'), "no token '<pad>'"),
        (lambda d: (d / "tokenizer.json").write_text("{oops"), "not a valid tokenizer file"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    ],
)
def test_broken_immich_tokenizer_files_are_a_bad_bundle(
    immich_bundle: Path, tmp_path: Path, change: Any, message: str
) -> None:
    bundle = Path(shutil.copytree(immich_bundle, tmp_path / "broken"))
    change(bundle / "textual")
    with pytest.raises(BadBundle, match=message):
        clipworks.load(bundle, profile="immich").tokenizer  # noqa: B018


@pytest.mark.parametrize(
    ("language", "code"),
    [("de-DE", "deu_Latn"), ("de", "deu_Latn"), ("pt-BR", "por_Latn"), ("zh-TW", "zho_Hant"), ("xx-YY", "eng_Latn")],
)
def test_nllb_language_codes_follow_immich(language: str, code: str) -> None:
    assert flores_code(language) == code
    assert immich_query("  ein   Hund ", language, nllb=True) == f"{code}ein Hund"
    assert immich_query("  ein   Hund ", language, nllb=False) == "ein Hund"


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()
