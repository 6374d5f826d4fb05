"""Multilingual towers: open_clip's Hugging Face text towers (XLM-RoBERTa with CLIP's softmax, NLLB with SigLIP's
sigmoid) exported with their tokenizers and run with open_clip's ids and embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.models.bundle import load_bundle
from clipworks.models.family import family_for_config
from clipworks.runtime.encoder import ClipModel

# German (umlauts, ß), Chinese, emoji, an empty prompt, and one longer than the 77-token context.
TEXTS = [
    "a photo of a dog",
    "ein Foto von einem Hund",
    "Grüße aus München: eine Straße bei Nacht",
    "一张狗的照片",
    "一只猫在沙发上睡觉 🐱",
    "🐶 🎩 🚗",
    "",
    "Hund und Katze " * 40,
]
KINDS = ["xlm_roberta", "nllb_siglip"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(params=KINDS)
def tower(request, source_model):
    """(bundle folder, open_clip source model, open_clip tokenizer) of each tiny multilingual model."""
    import open_clip

    config = request.getfixturevalue(f"{request.param}_config")
    bundle = request.getfixturevalue(f"{request.param}_bundle")
    src = source_model(config)
    return bundle, src, open_clip.get_tokenizer(src.arch)


def test_token_ids_are_open_clips(tower) -> None:
    bundle, _, open_clip_tokenizer = tower
    clip = ClipModel(load_bundle(bundle), device="cpu")
    np.testing.assert_array_equal(clip.tokenizer.encode(TEXTS), open_clip_tokenizer(TEXTS).numpy())


def test_text_embeddings_match_open_clip(tower) -> None:
    import torch

    bundle, src, open_clip_tokenizer = tower
    with torch.no_grad():
        expected = _unit(src.model.encode_text(open_clip_tokenizer(TEXTS)).numpy())
    clip = ClipModel(load_bundle(bundle), device="cpu")
    np.testing.assert_allclose(clip.encode_texts(TEXTS), expected, atol=1e-4)
    # One prompt at a time (rows cut to their own length) gives the same vectors as the padded batch.
    np.testing.assert_allclose(np.concatenate([clip.encode_texts([t]) for t in TEXTS]), expected, atol=1e-4)


def test_text_graph_takes_token_ids_alone_at_any_length(tower) -> None:
    bundle, _, open_clip_tokenizer = tower
    clip = ClipModel(load_bundle(bundle), device="cpu")
    assert clip.textual.input_name == "text" and clip.textual.input_shape[1] not in (None, 77)
    ids = open_clip_tokenizer(TEXTS[:4]).numpy()
    longest = int((ids != clip.tokenizer.pad_id).sum(axis=1).max())
    full, cut = clip.embed_token_batch(ids), clip.embed_token_batch(ids[:, :longest])
    np.testing.assert_allclose(full, cut, atol=1e-5)


def test_image_embeddings_match_open_clip(tower, photos) -> None:
    import torch

    bundle, src, _ = tower
    clip = ClipModel(load_bundle(bundle), device="cpu")
    pixels = np.stack([clip.preprocess(p) for p in photos])
    with torch.no_grad():
        expected = _unit(src.model.encode_image(torch.from_numpy(pixels)).numpy())
    np.testing.assert_allclose(clip.encode_images(photos), expected, atol=1e-4)


def test_probabilities_are_the_trained_ones(xlm_roberta_bundle, nllb_siglip_bundle, photos, source_model,
                                            xlm_roberta_config, nllb_siglip_config) -> None:  # fmt: skip
    import torch

    labels = ["ein Hund", "一只猫", "a car"]
    softmax = ClipModel(load_bundle(xlm_roberta_bundle), device="cpu")
    probs = softmax.probabilities(softmax.encode_images(photos), softmax.encode_texts(labels))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)  # CLIP's labels compete

    sigmoid = ClipModel(load_bundle(nllb_siglip_bundle), device="cpu")
    src = source_model(nllb_siglip_config).model
    cosines = sigmoid.encode_images(photos) @ sigmoid.encode_texts(labels).T
    with torch.no_grad():
        expected = torch.sigmoid(src.logit_scale.exp() * torch.from_numpy(cosines) + src.logit_bias).numpy()
    got = sigmoid.probabilities(sigmoid.encode_images(photos), sigmoid.encode_texts(labels))
    np.testing.assert_allclose(got, expected, atol=1e-5)  # each label on its own, with the learned bias
    assert sigmoid.logit_bias == pytest.approx(-10.0)


@pytest.mark.parametrize(
    ("arch", "family"),
    [
        ("xlm-roberta-base-ViT-B-32", "multilingual"),
        ("xlm-roberta-large-ViT-H-14", "multilingual"),
        ("nllb-clip-base", "multilingual"),
        ("nllb-clip-large", "multilingual"),
        ("mt5-base-ViT-B-32", "multilingual"),
        ("nllb-clip-base-siglip", "multilingual-siglip"),
        ("nllb-clip-large-siglip", "multilingual-siglip"),
        ("ViT-B-16-SigLIP2", "siglip"),
        ("ViT-B-16-SigLIP-i18n-256", "siglip"),
        ("ViT-B-32", "clip"),
        ("MobileCLIP-S2", "clip"),
    ],
)
def test_open_clip_configs_are_recognised(arch, family) -> None:
    """Immich's bundles record no family: their open_clip config.json decides, as for these open_clip models."""
    import open_clip

    assert family_for_config(open_clip.get_model_config(arch)).name == family


@pytest.mark.parametrize(("kind", "family"), [("xlm_roberta", "multilingual"), ("nllb_siglip", "multilingual-siglip")])
def test_bundle_records_its_family_and_loads_without_it(request, kind, family, tmp_path) -> None:
    bundle = request.getfixturevalue(f"{kind}_bundle")
    meta = json.loads((bundle / "clipworks.json").read_text())
    assert meta["family"] == family
    # The context is open_clip's tokenizer's 77, not the position table of the Hugging Face config (80 here).
    assert load_bundle(bundle).context_length == 77
    unrecorded = tmp_path / "bundle"  # as bundles written before families were recorded, or Immich's
    shutil.copytree(bundle, unrecorded)
    del meta["family"]
    (unrecorded / "clipworks.json").write_text(json.dumps(meta))
    clip = ClipModel(load_bundle(unrecorded), device="cpu")
    assert clip.family.name == family
    np.testing.assert_allclose(
        clip.encode_texts(TEXTS), ClipModel(load_bundle(bundle), device="cpu").encode_texts(TEXTS), atol=1e-6
    )


# -- the commands --------------------------------------------------------------------------------------------------
def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", KINDS)
def test_embed_texts_writes_open_clips_vectors(capsys, request, kind, tmp_path, source_model) -> None:
    import open_clip
    import torch

    bundle = request.getfixturevalue(f"{kind}_bundle")
    src = source_model(request.getfixturevalue(f"{kind}_config"))
    out = tmp_path / "prompts.json"
    code, _, err = run(capsys, "embed", "texts", *TEXTS[1:6], "--prefix", "", "-o", out, "-m", bundle)
    assert code == 0, err
    entries = [e for e in json.loads(out.read_text())["entries"] if e["text"]]
    assert [e["text"] for e in entries] == TEXTS[1:6]
    with torch.no_grad():
        expected = _unit(src.model.encode_text(open_clip.get_tokenizer(src.arch)(TEXTS[1:6])).numpy())
    np.testing.assert_allclose(np.array([e["embedding"] for e in entries]), expected, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_classify_ranks_multilingual_labels_as_open_clip(capsys, request, kind, photos, source_model) -> None:
    import open_clip
    import torch

    bundle = request.getfixturevalue(f"{kind}_bundle")
    src = source_model(request.getfixturevalue(f"{kind}_config"))
    labels = ["Hund", "猫", "🚗", "Straße"]
    code, out, err = run(capsys, "classify", photos[0], "--labels", *labels, "--template", "{}", "-m", bundle, "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    clip = ClipModel(load_bundle(bundle), device="cpu")
    with torch.no_grad():
        text = src.model.encode_text(open_clip.get_tokenizer(src.arch)(labels)).numpy()
    cosines = clip.encode_images(photos[0]) @ _unit(text).T
    assert [r["label"] for r in result["results"]] == [labels[i] for i in np.argsort(-cosines[0])]


@pytest.mark.parametrize("kind", KINDS)
def test_interrogate_captions_with_multilingual_tags(capsys, request, kind, photos, tmp_path) -> None:
    bundle = request.getfixturevalue(f"{kind}_bundle")
    tags = ["Hund", "Katze", "猫", "汽车", "🐶", "Grüße"]
    tags_file = tmp_path / "tags.txt"
    tags_file.write_text("\n".join(tags) + "\n", encoding="utf-8")
    args = ("interrogate", photos[0], "--tags-file", tags_file, "--threshold", "-1", "--top", "3", "--no-cache")
    code, out, err = run(capsys, *args, "-m", bundle, "--json")
    assert code == 0, err
    (item,) = json.loads(out)
    clip = ClipModel(load_bundle(bundle), device="cpu")
    cosines = (clip.encode_images(photos[0]) @ clip.encode_texts(tags).T)[0]
    assert item["caption"] == ", ".join(tags[i] for i in np.argsort(-cosines)[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_search_finds_photos_by_a_german_query(capsys, request, kind, photos, tmp_path) -> None:
    bundle = request.getfixturevalue(f"{kind}_bundle")
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    db = tmp_path / "lib.db"
    code, _, err = run(capsys, "index", "add", folder, "--db", db, "--model", bundle)
    assert code == 0, err
    code, out, err = run(capsys, "search", "Straße", "--db", db, "--top-k", str(len(photos)), "--json")
    assert code == 0, err
    hits = json.loads(out)
    clip = ClipModel(load_bundle(bundle), device="cpu")
    cosines = (clip.encode_images([folder / p.name for p in photos], mode="fast") @ clip.encode_texts(["Straße"]).T)[
        :, 0
    ]
    expected = sorted(zip(cosines, [p.name for p in photos], strict=True), reverse=True)
    assert [Path(h["path"]).name for h in hits] == [name for _, name in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [c for c, _ in expected], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_serve_embeds_multilingual_texts_as_open_clip(request, kind, tmp_path, source_model) -> None:
    import open_clip
    import requests
    import torch

    from clipworks.service import ServiceSettings, create_app
    from conftest import serve_app

    bundle = request.getfixturevalue(f"{kind}_bundle")
    src = source_model(request.getfixturevalue(f"{kind}_config"))
    texts = TEXTS[1:6]
    app = create_app(ServiceSettings(model=str(bundle), tags=["Hund"], tags_cache_dir=tmp_path / "tags"))
    with serve_app(app) as url:
        r = requests.post(f"{url}/v1/embeddings", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([row["embedding"] for row in r.json()["data"]])
    with torch.no_grad():
        expected = _unit(src.model.encode_text(open_clip.get_tokenizer(src.arch)(texts)).numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_video_show_pred_labels_a_frame_with_multilingual_prompts(capsys, request, kind, test_data) -> None:
    import re

    from clipworks.video.features import iter_feature_batches
    from clipworks.video.frames import plan_sampling, probe

    bundle = request.getfixturevalue(f"{kind}_bundle")
    video = test_data / "videos" / "v_GGSY1Qvo990.mp4"
    texts = ["ein Hund lächelt", "一个女人在举重", "🐶"]
    code, out, err = run(capsys, "video", "features", video, "--model", bundle, "--extraction-fps", 1,
                         "--show-pred", "--pred-texts", *texts)  # fmt: skip
    assert code == 0, err
    blocks = re.findall(r"  Logits \| Prob\. \| Label \n((?:.+\n)+)\n", out)
    assert len(blocks) == 18  # one per sampled frame
    clip = ClipModel(load_bundle(bundle), device="cpu")
    _, first = next(iter_feature_batches(clip, video, plan_sampling(probe(video), 1), batch_size=1))
    cosines = _unit(first[0]) @ clip.encode_texts(texts).T
    assert [line.split(" | ")[2] for line in blocks[0].splitlines()] == [texts[i] for i in np.argsort(-cosines)]
