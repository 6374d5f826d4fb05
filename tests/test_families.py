"""Model families: SigLIP's tokenizer, export, scores and commands against open_clip, and a family added by a test.

The SigLIP 2 bundle is a tiny random-weight export (tests/model_configs/tiny-siglip2.json) with a Gemma-style
tokenizer trained in tests/tiny_tokenizers.py; open_clip's torch model and its ``HFTokenizer`` are the reference.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.errors import BadBundle, UsageError
from clipworks.export.exporter import CHECK_PROMPTS, FP32_TOLERANCE
from clipworks.export.hf_text import write_hf_tokenizer_files
from clipworks.file_tokenizer import CLEANERS, FileTokenizer
from clipworks.models.bundle import load_bundle
from clipworks.models.family import FAMILIES, ClipFamily, Family, SiglipFamily, family_for, get_family, register_family
from clipworks.ops import l2_normalize
from tiny_tokenizers import KINDS

PROMPTS = [
    *CHECK_PROMPTS,
    "   ",
    "A_Photo, of: a DOG!!",
    "café crème brûlée",
    "ünïcödé 🎩 zebra ﬁ",
    "&amp;lt;b&amp;gt; bold &lt;/b&gt;",
    "tab\tnew\nline  spaces",
    "the text <pad> <eos> </s> [SEP] names special tokens",
    "日本語のテキスト",
    "a photo of the dog cat fruit street with buildings and cars at night seen from above wearing a red hat",
    "dog " * 40,
]


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def open_clip_tokenizer(folder: Path, context_length: int, **options):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(folder), context_length=context_length, **options)


# -- FileTokenizer against open_clip's HFTokenizer -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: make(root / kind) for kind, make in KINDS.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("clean", sorted(CLEANERS))
@pytest.mark.parametrize("context_length", [12, 64])
def test_exported_tokenizer_files_give_open_clips_ids(tokenizer_dirs, tmp_path, kind, clean, context_length) -> None:
    """What the exporter writes, read by FileTokenizer, is open_clip's HFTokenizer id for id, padding included."""
    strip = kind == "bert"
    reference = open_clip_tokenizer(tokenizer_dirs[kind], context_length, clean=clean, strip_sep_token=strip)
    write_hf_tokenizer_files(reference, tmp_path / "textual", context_length)
    ours = FileTokenizer.from_dir(tmp_path / "textual", context_length, clean=clean, strip_sep_token=strip)
    got = ours.encode(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), context_length)
    np.testing.assert_array_equal(got, reference(PROMPTS).numpy())
    # too_long names exactly the prompts whose ids (special tokens included) exceed the context length.
    full = reference.tokenizer([CLEANERS[clean](p) for p in PROMPTS]).input_ids
    assert ours.too_long(PROMPTS) == [p for p, ids in zip(PROMPTS, full, strict=True) if len(ids) > context_length]


def test_gemma_pads_on_the_left_and_the_export_says_so(tokenizer_dirs, tmp_path) -> None:
    """transformers pads Gemma (SigLIP 2) on the left by class default; the files must carry that side."""
    reference = open_clip_tokenizer(tokenizer_dirs["gemma"], 16)
    assert "padding_side" not in json.loads((tokenizer_dirs["gemma"] / "tokenizer_config.json").read_text())
    write_hf_tokenizer_files(reference, tmp_path, 16)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["padding_side"] == "left" and config["pad_token"] == "<pad>"
    row = FileTokenizer.from_dir(tmp_path, 16).encode(["a dog"])[0]
    assert row[0] == 0 and row[-1] == 1  # pad first, <eos> last
    # Read as Immich reads a folder without sides (tokenizers' default), the same file pads on the right.
    right = FileTokenizer.from_dir(tokenizer_dirs["gemma"], 16).encode(["a dog"])[0]
    assert right[0] == 2 and right[-1] == 0


@pytest.mark.parametrize("name", sorted(CLEANERS))
def test_cleaning_is_open_clips(name) -> None:
    from open_clip.tokenizer import get_clean_fn

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x2FF)] + list("_&;#\t\n 　。、！？🎩ﬁ") + ["&amp;", "&lt;", "&#39;"]
    texts = PROMPTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    reference = get_clean_fn(name)
    assert [CLEANERS[name](t) for t in texts] == [reference(t) for t in texts]


def test_rows_and_padding_lengths(tokenizer_dirs) -> None:
    tok = FileTokenizer.from_dir(tokenizer_dirs["sentencepiece"], 12)
    assert tok.encode([]).shape == (0, 12)
    assert tok.encode("a dog").shape == (1, 12)  # one string is one prompt, not characters
    wide = tok.encode(["a dog"], pad_to=20)
    assert wide.shape == (1, 20) and (wide[0, 12:] == tok.pad_id).all()
    with pytest.raises(UsageError, match="pad_to=2 is shorter than the longest prompt"):
        tok.encode(["a photo of a dog"], pad_to=2)


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _config(text: str):
    return lambda folder: _write(folder / "tokenizer_config.json", text)


BAD_TOKENIZER_DIRS = [
    pytest.param(lambda d: (d / "tokenizer.json").unlink(), {}, "tokenizer.json is missing", id="no-file"),
    pytest.param(lambda d: _write(d / "tokenizer.json", "{not json"), {}, "not a valid tokenizer file", id="bad-json"),
    pytest.param(lambda d: _write(d / "tokenizer.json", '{"a": 1}'), {}, "not a valid tokenizer file", id="not-tok"),
    pytest.param(_config("{"), {}, "is not valid JSON", id="bad-config"),
    pytest.param(_config("[]"), {}, "should hold a JSON object", id="list"),
    pytest.param(_config('{"pad_token": "<nope>"}'), {}, "has no token '<nope>'", id="pad-not-in-vocab"),
    pytest.param(_config('{"eos_token": "</s>"}'), {}, "names no pad token", id="no-pad-token"),
    pytest.param(
        _config('{"pad_token": {"content": "<pad>"}, "padding_side": "middle"}'),
        {},
        "padding_side must be 'left' or 'right'",
        id="bad-side",
    ),
    pytest.param(lambda d: None, {"clean": "shout"}, "text cleaning 'shout'", id="unknown-cleaning"),
    pytest.param(lambda d: None, {"strip_sep_token": True}, "names no sep_token", id="no-sep-token"),
]


@pytest.mark.parametrize(("spoil", "options", "message"), BAD_TOKENIZER_DIRS)
def test_broken_tokenizer_folders_are_named(tokenizer_dirs, tmp_path, spoil, options, message) -> None:
    folder = shutil.copytree(tokenizer_dirs["sentencepiece"], tmp_path / "textual")
    spoil(folder)
    with pytest.raises(BadBundle, match=message) as caught:
        FileTokenizer.from_dir(folder, 12, **options)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_a_context_too_short_for_the_special_tokens_is_refused(tokenizer_dirs) -> None:
    with pytest.raises(UsageError, match="more than the 2 special tokens"):
        FileTokenizer.from_dir(tokenizer_dirs["gemma"], 2)


# -- the SigLIP 2 bundle against open_clip ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(source_model, siglip2_config):
    return source_model(siglip2_config)


@pytest.fixture(scope="module")
def siglip(siglip2_bundle):
    import clipworks

    return clipworks.load(siglip2_bundle, precision="fp32")


def torch_texts(reference, texts: list[str]) -> np.ndarray:
    import open_clip
    import torch

    tokens = open_clip.get_tokenizer(reference.arch)(texts)
    with torch.no_grad():
        out = reference.model.encode_text(tokens).numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def torch_images(reference, paths: list[Path]) -> np.ndarray:
    import open_clip
    import torch
    from PIL import Image

    cfg = reference.preprocess_cfg
    transform = open_clip.image_transform(
        tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"],
        resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg["fill_color"],
    )  # fmt: skip
    with torch.no_grad():
        out = reference.model.encode_image(torch.stack([transform(Image.open(p)) for p in paths])).numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def torch_probabilities(reference, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    import torch

    model = reference.model
    with torch.no_grad():
        logits = torch.from_numpy(image_emb) @ torch.from_numpy(text_emb).T * model.logit_scale.exp() + model.logit_bias
        return torch.sigmoid(logits).numpy()


def test_the_bundle_records_its_family_bias_and_checks(siglip2_bundle, reference) -> None:
    bundle = load_bundle(siglip2_bundle)
    assert bundle.meta.family == "siglip" and isinstance(family_for(bundle), SiglipFamily)
    assert bundle.meta.logit_bias == pytest.approx(float(reference.model.logit_bias)) == pytest.approx(-10.0)
    assert bundle.meta.logit_scale == pytest.approx(float(reference.model.logit_scale.exp()))
    assert bundle.meta.checks["fp32"]["textual_max_abs_diff"] <= FP32_TOLERANCE
    assert bundle.available_precisions("textual") == ["fp32"]
    assert {p.name for p in bundle.textual_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}


def test_embeddings_and_probabilities_are_open_clips(siglip, reference, photos) -> None:
    texts = [*PROMPTS, "a dog", "a cat"]
    text_emb = siglip.encode_texts(texts, batch_size=5)
    np.testing.assert_allclose(text_emb, torch_texts(reference, texts), atol=1e-4)
    image_emb = siglip.encode_images(photos[:4])
    np.testing.assert_allclose(image_emb, torch_images(reference, photos[:4]), atol=1e-4)
    probs = siglip.probabilities(image_emb, text_emb)
    np.testing.assert_allclose(probs, torch_probabilities(reference, image_emb, text_emb), atol=1e-4)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # sigmoids: labels do not share one unit of probability


def test_a_bundle_without_clipworks_json_is_recognised_from_its_config(siglip2_bundle, siglip, tmp_path) -> None:
    """Immich's SigLIP bundles carry only open_clip's config.json: the family comes from it, the bias does not."""
    import clipworks

    copy = shutil.copytree(siglip2_bundle, tmp_path / "immich-style")
    (copy / "clipworks.json").unlink()
    model = clipworks.load(copy, precision="fp32")
    assert isinstance(model.family, SiglipFamily)
    # Immich's graphs normalise, so a bundle without clipworks.json is taken to: compare directions.
    np.testing.assert_allclose(l2_normalize(model.encode_texts(["a dog"])), siglip.encode_texts(["a dog"]), atol=1e-6)
    with pytest.raises(BadBundle, match="records no logit_bias"):
        model.probabilities(np.ones((1, 64)) / 8, np.ones((1, 64)) / 8)


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"embed_dim": 8, "text_cfg": {"hf_tokenizer_name": "timm/ViT-B-16-SigLIP2"}}, "siglip"),
        ({"embed_dim": 8, "init_logit_bias": -10, "text_cfg": {"hf_tokenizer_name": "/models/my-tokenizer"}}, "siglip"),
        ({"embed_dim": 8, "text_cfg": {"context_length": 77}}, "clip"),
        ({"embed_dim": 8, "init_logit_bias": -10, "text_cfg": {}}, "clip"),  # sigmoid loss, but CLIP's BPE text
        ({"embed_dim": 8, "text_cfg": {"hf_tokenizer_name": "xlm-roberta-base"}}, "clip"),
    ],
)
def test_families_are_recognised_from_open_clip_configs(config, family) -> None:
    from clipworks.models.family import family_for_config

    assert family_for_config(config).name == family


def test_open_clips_siglip_configs_are_recognised() -> None:
    """Every sigmoid-loss config of open_clip, NLLB-SigLIP included (until a multilingual family claims it)."""
    import open_clip

    for arch in open_clip.list_models():
        config = open_clip.get_model_config(arch)
        assert SiglipFamily.recognises(config) == ("siglip" in arch.lower()), arch


# -- commands with the SigLIP 2 bundle ---------------------------------------------------------------------------


def test_embed_texts_writes_open_clips_embeddings(capsys, siglip2_bundle, reference, photos, tmp_path) -> None:
    out = tmp_path / "prompts.json"
    code, stdout, err = run(capsys, "embed", "texts", "a dog", "fruit", "-n", "a person", "-o", out,
                            "-m", siglip2_bundle, "--image-path", photos[0])  # fmt: skip
    assert code == 0, err
    entries = json.loads(out.read_text())["entries"]
    by_text = {e["text"]: np.array(e["embedding"]) for e in entries}
    # with Hailo's prefix, as embed texts writes them
    want = torch_texts(reference, ["A photo of a a dog", "A photo of a fruit", "A photo of a a person"])
    for text, vector in zip(["a dog", "fruit", "a person"], want, strict=True):
        np.testing.assert_allclose(by_text[text], vector, atol=1e-4)
    assert "best:" in stdout


def test_classify_prints_open_clips_sigmoid_probabilities(capsys, siglip2_bundle, reference, photos) -> None:
    labels = ["dog", "cat", "fruit"]
    code, out, err = run(capsys, "classify", *photos[:2], "--labels", *labels, "-m", siglip2_bundle, "--json")
    assert code == 0, err
    prompts = [f"a photo of a {label}." for label in labels]
    want = torch_probabilities(reference, torch_images(reference, photos[:2]), torch_texts(reference, prompts))
    for row, expected in zip(json.loads(out), want, strict=True):
        got = {r["label"]: r["prob"] for r in row["results"]}
        assert [r["label"] for r in row["results"]] == [labels[i] for i in np.argsort(-expected, kind="stable")]
        for label, p in zip(labels, expected, strict=True):
            assert got[label] == pytest.approx(float(p), abs=1e-4)


def test_interrogate_ranks_tags_by_open_clips_cosines(capsys, siglip2_bundle, reference, photos, tmp_path) -> None:
    tags = ["dog", "cat", "fruit", "building", "street"]
    tags_file = tmp_path / "tags.txt"
    tags_file.write_text("\n".join(tags) + "\n")
    code, out, err = run(capsys, "interrogate", photos[0], "--tags-file", tags_file, "--threshold", "-1",
                         "--top", len(tags), "--no-cache", "-m", siglip2_bundle, "--json")  # fmt: skip
    assert code == 0, err
    found = json.loads(out)[0]["interrogations"]
    cosines = torch_texts(reference, tags) @ torch_images(reference, photos[:1])[0]
    assert [t["tag"] for t in found] == [tags[i] for i in np.argsort(-cosines, kind="stable")]
    assert [t["score"] for t in found] == pytest.approx(sorted(cosines, reverse=True), abs=1e-4)


def test_index_and_search(capsys, siglip2_bundle, reference, photos, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:5]:
        shutil.copy(p, folder / p.name)
    db = tmp_path / "lib.db"
    # open_clip's own pixels, to compare with its torch model below.
    argv = ["index", "add", str(folder), "--db", str(db), "--model", str(siglip2_bundle), "--preprocess", "exact"]
    assert main(argv) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "search", "a", "dog", "--db", db, "--top-k", 5, "--json")
    assert code == 0, err
    hits = json.loads(out)
    files = sorted(folder.iterdir())
    cosines = torch_images(reference, files) @ torch_texts(reference, ["a dog"])[0]
    assert [Path(h["path"]).name for h in hits] == [files[i].name for i in np.argsort(-cosines, kind="stable")]
    assert [h["score"] for h in hits] == pytest.approx(sorted(cosines, reverse=True), abs=1e-4)


def test_video_features_show_pred(capsys, siglip2_bundle, test_data) -> None:
    texts = ["a dog smiles", "a woman is lifting"]
    code, out, err = run(capsys, "video", "features", test_data / "videos" / "v_GGSY1Qvo990.mp4",
                         "--model", siglip2_bundle, "--extraction-fps", 1, "--batch-size", 6,
                         "--show-pred", "--pred-texts", *texts)  # fmt: skip
    assert code == 0, err
    blocks = [b for b in out.split("  Logits | Prob. | Label \n")[1:]]
    assert len(blocks) == 18 and all(t in blocks[0] for t in texts)


def test_stream_labels_frames(capsys, siglip2_bundle, test_data, tmp_path) -> None:
    prompts = tmp_path / "embeddings.json"
    assert main(["embed", "texts", "a person walking", "a street", "-o", str(prompts), "-m", str(siglip2_bundle)]) == 0
    events = tmp_path / "events.jsonl"
    code, _, err = run(capsys, "stream", "--input", test_data / "videos" / "v_ZNVhz7ctTq0.mp4", "--model",
                       siglip2_bundle, "--json-path", prompts, "--events", events, "--max-frames", 3)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert all(r["label"] in {"a person walking", "a street"} and 0 <= r["probability"] <= 1 for r in rows)


def test_serve_embeds_texts_as_open_clip_does(siglip, reference, photos, tmp_path) -> None:
    import base64

    import requests

    from clipworks.service import ServiceSettings, create_app
    from conftest import serve_app

    app = create_app(ServiceSettings(tags=["dog", "cat"], tags_cache_dir=tmp_path / "tags"), model=siglip)
    with serve_app(app) as url:
        image = base64.b64encode(photos[0].read_bytes()).decode()
        r = requests.post(f"{url}/v1/embeddings", json={"texts": ["a dog", "fruit"], "images": [image]}, timeout=30)
    assert r.status_code == 200, r.text
    rows = {(d["type"], d["index"]): d["embedding"] for d in r.json()["data"]}
    want = torch_texts(reference, ["a dog", "fruit"])
    np.testing.assert_allclose([rows["text", 0], rows["text", 1]], want, atol=1e-4)
    np.testing.assert_allclose([rows["image", 2]], torch_images(reference, photos[:1]), atol=1e-4)


# -- a family added by one class ------------------------------------------------------------------------------


class CharTokenizer:
    """Each character's code point, 1..255, padded with 0 to 77: enough for the tiny ViT's 49408-token tower."""

    context_length = 77
    pad_id = 0

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts, pad_to=None):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), pad_to or self.context_length), np.int64)
        for i, text in enumerate(texts):
            ids = [min(ord(c), 255) for c in text[: self.context_length - 1]] + [49407]
            out[i, : len(ids)] = ids
        return out

    def too_long(self, texts):
        return [t for t in texts if len(t) >= self.context_length]


@pytest.fixture
def fake_family(monkeypatch):
    """A family registered for one test only: its own tokenizer and 'probabilities' that are the cosines + 2."""
    monkeypatch.setattr("clipworks.models.family.FAMILIES", dict(FAMILIES))

    @register_family
    class PlusTwo(Family):
        name = "plus-two"
        summary = "test family: character ids, cosine + 2"
        tokenizer_made = CharTokenizer()

        @classmethod
        def recognises(cls, config):
            return config.get("text_cfg", {}).get("tokenizer") == "chars"

        def tokenizer(self, bundle):
            return self.tokenizer_made

        def probabilities(self, cosines, logit_scale, logit_bias):
            return np.asarray(cosines) + 2.0

    return PlusTwo


def _with_meta(src: Path, dest: Path, **changes) -> Path:
    copy = shutil.copytree(src, dest)
    meta = json.loads((copy / "clipworks.json").read_text())
    meta.update(changes)
    (copy / "clipworks.json").write_text(json.dumps(meta))
    return copy


def test_a_registered_family_decides_tokens_and_probabilities(fake_family, vit_bundle, tmp_path, photos) -> None:
    import clipworks

    model = clipworks.load(_with_meta(vit_bundle, tmp_path / "b", family="plus-two"))
    assert isinstance(model.family, fake_family)
    text = model.encode_texts(["ab", "a dog"])
    assert fake_family.tokenizer_made.calls == [["ab", "a dog"]]
    tokens = CharTokenizer().encode(["ab", "a dog"])
    raw = model.embed_token_batch(tokens, normalize=True)  # the family's tokens, full rows (no trimming)
    np.testing.assert_allclose(text, raw, atol=1e-6)
    image = model.encode_images(photos[:1])
    np.testing.assert_allclose(model.probabilities(image, text), image @ text.T + 2.0, atol=1e-6)


def test_a_registered_family_is_recognised_from_the_config(fake_family, vit_bundle, tmp_path) -> None:
    copy = _with_meta(vit_bundle, tmp_path / "b", family=None)
    config = json.loads((copy / "config.json").read_text())
    config["text_cfg"]["tokenizer"] = "chars"
    (copy / "config.json").write_text(json.dumps(config))
    assert isinstance(family_for(load_bundle(copy)), fake_family)
    assert isinstance(get_family("clip"), ClipFamily)


def test_classify_prints_the_registered_familys_probabilities(capsys, fake_family, vit_bundle, tmp_path, photos):
    import clipworks

    bundle = _with_meta(vit_bundle, tmp_path / "b", family="plus-two")
    code, out, err = run(capsys, "classify", photos[0], "--labels", "dog", "cat", "-m", bundle, "--json")
    assert code == 0, err
    model = clipworks.load(bundle)
    cosines = model.encode_texts(["a photo of a dog.", "a photo of a cat."]) @ model.encode_images(photos[:1])[0]
    got = {r["label"]: r["prob"] for r in json.loads(out)[0]["results"]}
    assert got == pytest.approx({"dog": cosines[0] + 2.0, "cat": cosines[1] + 2.0}, abs=1e-5)


def test_an_unknown_recorded_family_is_a_clear_error(vit_bundle, tmp_path) -> None:
    import clipworks

    with pytest.raises(BadBundle, match=r"unknown model family 'siglip9'.*upgrade clipworks"):
        clipworks.load(_with_meta(vit_bundle, tmp_path / "b", family="siglip9"))


def test_the_example_family_in_the_docs_runs(monkeypatch, siglip2_bundle, tmp_path, photos) -> None:
    """docs/ENGINE.md's smallest family, executed as written, tokenizes and scores a bundle."""
    import re

    import clipworks

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ENGINE.md").read_text()
    section = doc[doc.index("## Families") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.setattr("clipworks.models.family.FAMILIES", dict(FAMILIES))
    exec(compile(code, "docs/ENGINE.md", "exec"), {})
    model = clipworks.load(_with_meta(siglip2_bundle, tmp_path / "b", family="temperature"), precision="fp32")
    assert type(model.family).__name__ == "TemperatureFamily"
    text, image = model.encode_texts(["a dog", "a cat", "fruit"]), model.encode_images(photos[:2])
    z = 50.0 * image.astype(np.float64) @ text.T.astype(np.float64)
    want = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(model.probabilities(image, text), want / want.sum(axis=1, keepdims=True), atol=1e-6)
