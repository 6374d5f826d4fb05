"""Immich compatibility: the "immich" preprocessing profile and Immich's machine-learning API.

The reference side re-implements Immich's own steps independently (immich_ml's decode_pil / resize_pil /
crop_pil / normalize, and OpenClipTextualEncoder's use of tokenizer.json) with plain Pillow, numpy, tokenizers
and ONNX Runtime, on an Immich-layout bundle: no clipworks.json, graphs that L2-normalise inside and take
int32 token ids, as Immich's exporter writes them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from PIL import Image
from tokenizers import Tokenizer

import clipworks
from clipworks.errors import BadBundle, UsageError
from clipworks.file_tokenizer import FileTokenizer
from clipworks.profiles import PROFILES, flores_code, immich_query
from clipworks.service.immich import UnknownImmichModel, model_source
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
    return np.array([_reference_tokenizer(bundle).encode(" ".join(text.split())).ids], dtype=np.int32)


@functools.cache
def _reference_tokenizer(bundle: Path) -> Tokenizer:
    text_cfg = json.loads((bundle / "config.json").read_text())["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    pad_token = json.loads((bundle / "textual" / "tokenizer_config.json").read_text())["pad_token"]
    tokenizer = Tokenizer.from_file((bundle / "textual" / "tokenizer.json").as_posix())
    tokenizer.enable_padding(length=context_length, pad_token=pad_token, pad_id=tokenizer.token_to_id(pad_token))
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


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


# -- (B) Immich's machine-learning API ---------------------------------------------------------------------

MODEL = "ViT-B-32__openai"


def immich_form(entries: dict[str, Any], image: bytes | None = None, text: str | None = None) -> dict[str, Any]:
    """httpx arguments for the body Immich's server builds (getFormData): always multipart (a FormData), first
    ``entries`` as JSON.stringify writes it (no spaces, undefined options dropped), then the image as a Blob
    (file name "blob", octet-stream) or the text as a plain field."""
    parts: list[tuple[str, tuple[str | None, Any] | tuple[str, bytes, str]]] = [
        ("entries", (None, json.dumps(entries, separators=(",", ":"))))
    ]
    if image is not None:
        parts.append(("image", ("blob", image, "application/octet-stream")))
    elif text is not None:
        parts.append(("text", (None, text)))
    return {"files": parts}


def raw_entries(entries: str) -> dict[str, Any]:
    return {"files": [("entries", (None, entries))]}


INVALID = "Invalid request format."
MISSING_ENTRIES = {"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}


def visual(name: str = MODEL) -> dict[str, Any]:
    return {"clip": {"visual": {"modelName": name}}}


def textual(name: str = MODEL, language: str | None = None) -> dict[str, Any]:
    return {"clip": {"textual": {"modelName": name, "options": {"language": language} if language else {}}}}


@pytest.fixture(scope="module")
def cache_folder(immich_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Immich's model cache layout: <MACHINE_LEARNING_CACHE_FOLDER>/clip/<model name>."""
    folder = tmp_path_factory.mktemp("immich-cache")
    shutil.copytree(immich_bundle, folder / "clip" / MODEL)
    return folder


def immich_app(cache_folder: Path, tmp_path: Path, **kw: Any) -> Any:
    from clipworks.service import ServiceSettings, create_app
    from clipworks.service.immich import ImmichSettings

    immich = ImmichSettings(cache_folder=cache_folder, **kw.pop("immich", {}))
    return create_app(ServiceSettings(model=str(cache_folder / "clip" / MODEL), tags_cache_dir=tmp_path,
                                      immich=immich, **kw))  # fmt: skip


@pytest.fixture(scope="module")
def server(cache_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import serve_app

    app = immich_app(cache_folder, tmp_path_factory.mktemp("tags"))
    with serve_app(app) as url:
        yield url, app


def test_root_and_ping_answer_as_immich(server: Any) -> None:
    url, _ = server
    root = httpx.get(url + "/")
    assert root.status_code == 200 and root.json() == {"message": "Immich ML"}
    ping = httpx.get(url + "/ping")
    assert (ping.status_code, ping.text, ping.headers["content-type"]) == (200, "pong", "text/plain; charset=utf-8")


@pytest.mark.parametrize("case", IMMICH_CASES)
def test_predict_visual_equals_immichs_service(server: Any, reference: ImmichReference, case: str) -> None:
    url, _ = server
    data = IMMICH_CASES[case]()
    response = httpx.post(url + "/predict", **immich_form(visual(), image=data), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"clip", "imageHeight", "imageWidth"} and isinstance(body["clip"], str)
    with Image.open(io.BytesIO(data)) as stored:  # Immich reports the stored size, EXIF rotation unapplied
        assert (body["imageWidth"], body["imageHeight"]) == stored.size
    served = np.array(json.loads(body["clip"]), dtype=np.float32)
    np.testing.assert_allclose(served, reference.image(data), atol=1e-6)
    assert body["clip"] == orjson.dumps(served, option=orjson.OPT_SERIALIZE_NUMPY).decode()  # float32 spelling


@pytest.mark.parametrize("language", [None, "de-DE", "xx"])
def test_predict_textual_equals_immichs_service(server: Any, reference: ImmichReference, language: str | None) -> None:
    url, _ = server
    for text in HARD_TEXTS:
        response = httpx.post(url + "/predict", **immich_form(textual(language=language), text=text), timeout=60)
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"clip"}
        served = np.array(json.loads(response.json()["clip"]), dtype=np.float32)
        np.testing.assert_allclose(served, reference.text(text), atol=1e-6)


def test_concurrent_image_requests_are_batched_and_each_gets_its_own_vector(
    server: Any, reference: ImmichReference
) -> None:
    url, app = server
    blobs = [IMMICH_CASES["rgba png"]()] + [IMMICH_CASES["greyscale png"]()] * 3 + [IMMICH_CASES["tiny 3x1"]()] * 4

    def send(data: bytes) -> np.ndarray:
        response = httpx.post(url + "/predict", **immich_form(visual(), image=data), timeout=60)
        assert response.status_code == 200, response.text
        return np.array(json.loads(response.json()["clip"]), dtype=np.float32)

    held = app.state.clip.immich.acquire(MODEL)
    app.state.clip.immich.release(held)
    before = held.batcher.stats.items
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(send, blobs))
    for data, vector in zip(blobs, served, strict=True):
        np.testing.assert_allclose(vector, reference.image(data), atol=1e-6)
    assert held.batcher.stats.items - before == len(blobs)


@pytest.mark.parametrize(
    ("form", "status", "detail"),
    [
        (raw_entries("{not json"), 422, INVALID),
        (raw_entries("[]"), 422, INVALID),
        (raw_entries('"clip"'), 422, INVALID),
        (raw_entries('{"clip": "visual"}'), 422, INVALID),
        (raw_entries('{"clip": {"visual": {}}}'), 422, INVALID),
        (raw_entries('{"clip": {"visual": ["ViT-B-32__openai"]}}'), 422, INVALID),
        (raw_entries('{"clip": {"visual": {"modelName": 7}}}'), 422, INVALID),
        (raw_entries('{"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": []}}}'), 422, INVALID),
        ({"files": [("text", (None, "a dog"))]}, 422, [MISSING_ENTRIES]),
        (immich_form(visual()), 400, "Either image or text must be provided"),
        (immich_form(textual()), 400, "Either image or text must be provided"),
        (immich_form(visual(), text="a dog"), 400, "clip visual needs an image"),
        (immich_form(textual(), image=b"\x89PNG"), 400, "image: not an image"),
        (immich_form(visual(), image=b"GIF89a garbage"), 400, "image: not an image"),
        (immich_form(visual("ViT-Q-99__nobody"), image=IMMICH_CASES["tiny 3x1"]()), 422, "Unknown CLIP model 'ViT-Q"),
        (immich_form(textual("XLM-Roberta-Large-Vit-B-16Plus"), text="x"), 422, "is not served by clipworks"),
        (immich_form({"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                                             "recognition": {"modelName": "buffalo_l"}}}, image=b"x"), 422,
         "does not serve Immich's facial-recognition task (Facial Recognition)"),
        (immich_form({"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}}}, image=b"x"), 422,
         "does not serve Immich's ocr task (OCR)"),
        (immich_form({"clip": {"detection": {"modelName": MODEL}}}, text="x"), 422, "Unknown model combination"),
    ],
)  # fmt: skip
def test_predict_refuses_bad_requests_with_immichs_codes(
    server: Any, form: dict[str, Any], status: int, detail: Any
) -> None:
    url, _ = server
    response = httpx.post(url + "/predict", **form, timeout=60)
    assert response.status_code == status, response.text
    got = response.json()["detail"]
    if isinstance(detail, list):
        assert [{k: e[k] for k in detail[0]} for e in got] == detail
    else:
        assert got.startswith(detail) or detail in got, got


def test_models_unload_after_the_ttl_but_preloaded_ones_stay(
    cache_folder: Path, tmp_path: Path, immich_bundle: Path
) -> None:
    from conftest import serve_app

    other = tmp_path / "cache"
    shutil.copytree(cache_folder, other)
    shutil.copytree(immich_bundle, other / "clip" / "ViT-B-16__openai")
    app = immich_app(other, tmp_path, immich={"model_ttl": 0.3, "ttl_poll_s": 0.05, "preload": ("ViT-B-16__openai",)})
    models = app.state.clip.immich
    with serve_app(app) as url:
        assert models.loaded == ["ViT-B-16__openai"]  # preloaded at start
        response = httpx.post(url + "/predict", **immich_form(textual(), text="a dog"), timeout=60)
        assert response.status_code == 200 and models.loaded == ["ViT-B-16__openai", MODEL]
        deadline = time.monotonic() + 10
        while MODEL in models.loaded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert models.loaded == ["ViT-B-16__openai"]
        # Asked for again, it loads again.
        response = httpx.post(url + "/predict", **immich_form(visual(), image=IMMICH_CASES["tiny 3x1"]()), timeout=60)
        assert response.status_code == 200 and MODEL in models.loaded


def test_predict_shares_the_services_limits_and_api_key(cache_folder: Path, tmp_path: Path) -> None:
    from conftest import serve_app

    app = immich_app(cache_folder, tmp_path, api_key="s3cret", max_body_bytes=200_000, max_pixels=500_000)
    big = IMMICH_CASES["png 1000x667"]()  # 667 000 pixels, and a body over 200 kB
    with serve_app(app) as url:
        assert httpx.get(url + "/ping").status_code == 401
        form = immich_form(visual(), image=IMMICH_CASES["tiny 3x1"]())
        assert httpx.post(url + "/predict", **form).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + "/predict", headers=auth, **form, timeout=60).status_code == 200
        response = httpx.post(url + "/predict", headers=auth, **immich_form(visual(), image=big), timeout=60)
        assert response.status_code == 413, response.text
        small_but_wide = _encoded_png(Image.new("RGB", (1000, 600)))  # compresses to a few kB
        response = httpx.post(url + "/predict", headers=auth, **immich_form(visual(), image=small_but_wide))
        assert response.status_code == 413 and "over the limit of 500000" in response.json()["detail"]


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("ViT-B-32__openai", "ViT-B-32::openai"),
        ("immich-app/ViT-B-32__openai", "ViT-B-32::openai"),
        ("ViT-B-32__laion2b-s34b-b79k", "ViT-B-32::laion2b_s34b_b79k"),
        ("ViT-L-14-336__openai", "ViT-L-14-336::openai"),
        ("RN50__yfcc15m", "RN50::yfcc15m"),
    ],
)
def test_immich_names_map_to_the_registry(name: str, source: str) -> None:
    assert model_source(name) == source


def test_a_bundle_in_immichs_cache_folder_wins(cache_folder: Path) -> None:
    assert model_source("immich-app/ViT-B-32__openai", cache_folder) == str(cache_folder / "clip" / MODEL)
    assert model_source("nllb-clip-base-siglip__v1", cache_folder) == "nllb-clip-base-siglip::v1"  # the registry's
    with pytest.raises(UnknownImmichModel, match=r"put its bundle in .*clip/XLM-Roberta-Large-Vit-B-16Plus"):
        model_source("XLM-Roberta-Large-Vit-B-16Plus", cache_folder)


def test_serve_reads_immichs_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clipworks.cli.serve import immich_settings

    monkeypatch.setenv("MACHINE_LEARNING_PRELOAD__CLIP__VISUAL", "ViT-B-32__openai, ViT-B-16__openai")
    monkeypatch.setenv("MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL", "ViT-B-32__openai")
    got = immich_settings(60, None, tmp_path)
    assert (got.model_ttl, got.preload, got.cache_folder) == (60, ("ViT-B-32__openai", "ViT-B-16__openai"), tmp_path)
    assert immich_settings(0, ["RN50__openai"], None).preload == ("RN50__openai",)
    with pytest.raises(UsageError, match="is not a folder"):
        immich_settings(0, None, tmp_path / "missing")


def _encoded_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_serve_immich_command_preloads_from_immichs_environment(cache_folder: Path, tmp_path: Path) -> None:
    """`clipworks serve --immich` as an Immich user starts it: no --model, Immich's variables, offline."""
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(clipworks.__file__).parents[1]), "CLIPWORKS_HOME": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf"), "CLIPWORKS_OFFLINE": "1",
           "MACHINE_LEARNING_CACHE_FOLDER": str(cache_folder), "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": MODEL,
           "MACHINE_LEARNING_MODEL_TTL": "0"}  # fmt: skip
    command = [sys.executable, "-m", "clipworks.cli.main", "serve", "--immich", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).text == "pong":
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        form = immich_form(visual(), image=IMMICH_CASES["tiny 3x1"]())
        response = httpx.post(f"http://127.0.0.1:{port}/predict", **form, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"Immich model {MODEL} loaded" in output or "Immich's machine-learning API" in output, output

    env["MACHINE_LEARNING_PRELOAD__CLIP__VISUAL"] = "ViT-Q-99__nobody"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Unknown CLIP model 'ViT-Q-99__nobody'" in done.stderr and "Traceback" not in done.stderr, done.stderr
