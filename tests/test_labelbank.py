"""The label bank: one text matrix per (model, templates, labels), cached on disk, scored by the model's family."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import clipworks
from clipworks import ops, zeroshot
from clipworks.labelbank import LabelBank, Scoring, cache_key
from clipworks.models.family import ClipFamily
from clipworks.models.fingerprint import model_fingerprint
from clipworks.prompts import PromptSet, encode_entries, match_probabilities
from clipworks.video.predict import FramePredictor

LABELS = ["dog", "cat", "oil painting"]


@pytest.fixture(scope="module")
def model(vit_bundle):
    return clipworks.load(vit_bundle)


def counting(model):
    calls: list[int] = []

    def encode(texts):
        calls.append(len(texts))
        return model.encode_texts(texts)

    return encode, calls


# -- the matrix -----------------------------------------------------------------------------------


def test_templates_are_averaged_per_label_as_clip_does(model) -> None:
    templates = ["a photo of a {}.", "a drawing of the {}."]
    bank = LabelBank.build(model, LABELS, templates)
    rows = ops.l2_normalize(model.encode_texts([t.format(x) for x in LABELS for t in templates]))
    expected = ops.l2_normalize(rows.reshape(len(LABELS), 2, -1).mean(axis=1))
    np.testing.assert_allclose(bank.matrix, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bank.matrix, axis=1), 1.0, atol=1e-6)
    assert bank.labels == LABELS and bank.matrix.dtype == np.float32


# -- the disk cache -------------------------------------------------------------------------------


def test_cache_is_reused_only_for_the_same_model_templates_and_labels(model, vit_bundle, rn_bundle, tmp_path) -> None:
    encode, calls = counting(model)
    first = LabelBank.build(model, LABELS, ["{}"], cache_dir=tmp_path, encode=encode)
    again = LabelBank.build(model, LABELS, ["{}"], cache_dir=tmp_path, encode=encode)
    assert calls == [3] and not first.from_cache and again.from_cache
    np.testing.assert_array_equal(first.matrix, again.matrix)

    copy = tmp_path / "copy"
    shutil.copytree(vit_bundle, copy)
    others = {
        "another model": (clipworks.load(rn_bundle), ["{}"], LABELS),
        "the same bundle re-exported elsewhere": (clipworks.load(copy), ["{}"], LABELS),
        "another precision": (clipworks.load(vit_bundle, precision="int8"), ["{}"], LABELS),
        "another template": (model, ["a photo of {}"], LABELS),
        "one more template": (model, ["{}", "a photo of {}"], LABELS),
        "another label list": (model, ["{}"], [*LABELS, "bird"]),
    }
    keys = {cache_key(model, ["{}"], LABELS)}
    for why, (other, templates, labels) in others.items():
        bank = LabelBank.build(other, labels, templates, cache_dir=tmp_path)
        assert not bank.from_cache, why
        keys.add(bank.cache_path.stem)
    assert len(keys) == len(others) + 1
    assert sorted(p.stem for p in tmp_path.glob("*.npy")) == sorted(keys)


def test_templates_and_labels_cannot_run_into_each_other_in_the_key(model) -> None:
    assert cache_key(model, ["a {}", "b {}"], ["c"]) != cache_key(model, ["a {}"], ["b {}", "c"])


def _truncated(path, bank) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _object_array(path, bank) -> None:
    np.save(path, np.array([{"x": 1}] * len(bank.labels), dtype=object), allow_pickle=True)


def _with_nan(path, bank) -> None:
    bad = bank.matrix.copy()
    bad[1, 3] = np.nan
    np.save(path, bad)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path, bank: path.write_bytes(b""), id="empty file"),
        pytest.param(lambda path, bank: path.write_bytes(b"not numpy at all"), id="not numpy"),
        pytest.param(_truncated, id="truncated"),
        pytest.param(_object_array, id="pickled objects"),
        pytest.param(lambda path, bank: np.save(path, bank.matrix[:2]), id="too few rows"),
        pytest.param(lambda path, bank: np.save(path, bank.matrix[:, :-1]), id="wrong dimension"),
        pytest.param(lambda path, bank: np.save(path, bank.matrix.astype(np.float64)), id="wrong dtype"),
        pytest.param(lambda path, bank: np.save(path, bank.matrix[0]), id="one-dimensional"),
        pytest.param(_with_nan, id="NaN inside"),
    ],
)
def test_a_damaged_cache_file_is_rebuilt_and_replaced(model, tmp_path, damage) -> None:
    bank = LabelBank.build(model, LABELS, cache_dir=tmp_path)
    damage(bank.cache_path, bank)
    rebuilt = LabelBank.build(model, LABELS, cache_dir=tmp_path)
    assert not rebuilt.from_cache and rebuilt.cache_path == bank.cache_path
    np.testing.assert_allclose(rebuilt.matrix, bank.matrix, atol=1e-6)
    assert np.isfinite(rebuilt.matrix).all()
    healed = LabelBank.build(model, LABELS, cache_dir=tmp_path)
    assert healed.from_cache
    np.testing.assert_array_equal(healed.matrix, rebuilt.matrix)


def test_one_fingerprint_the_library_view_keeps_its_stored_form(model, vit_bundle) -> None:
    meta = model.bundle.meta
    fp = model_fingerprint(model)
    # The library stores (name, weights) with its vectors: the form existing databases hold.
    assert fp.vectors == (model.name, meta.source_sha256 or f"{meta.model}::{meta.pretrained}")
    int8 = model_fingerprint(clipworks.load(vit_bundle, precision="int8"))
    assert int8.vectors == fp.vectors  # the same weights: library vectors compare
    assert int8.key() != fp.key()  # another text graph: cached text matrices do not


# -- scoring goes through the family --------------------------------------------------------------


class BiasedSigmoid(ClipFamily):
    """A stand-in for SigLIP: CLIP's tokenizer, but an independent sigmoid per label with a bias."""

    name = "test-sigmoid"
    shared_scale = None

    def probabilities(self, cosines, logit_scale, logit_bias):
        return ops.sigmoid(logit_scale * np.asarray(cosines, np.float64) + logit_bias)


def _bundle_with(root, vit_bundle, **meta):
    shutil.copytree(vit_bundle, root)
    data = json.loads((root / "clipworks.json").read_text())
    data.update(meta)
    (root / "clipworks.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module", params=["clip at scale 10", "biased sigmoid"])
def scored_model(request, tmp_path_factory, vit_bundle):
    """A model whose bundle scale (10) is not CLIP's 100, with CLIP's family or a sigmoid one."""
    root = tmp_path_factory.mktemp("scored") / "bundle"
    if request.param == "clip at scale 10":
        return clipworks.load(_bundle_with(root, vit_bundle, logit_scale=10.0))
    model = clipworks.load(_bundle_with(root, vit_bundle, logit_scale=10.0, logit_bias=-2.0))
    model.family = BiasedSigmoid()
    return model


def _classify(model, images, labels):
    rows = zeroshot.classify(model, images, labels, template="{}", top_k=None)
    return np.array([[{s.label: s.prob for s in row}[x] for x in labels] for row in rows])


def _categories(model, images, labels):
    results = zeroshot.CategorySet.build(model, {"what": labels}, template="{}").evaluate(model.encode_images(images))
    return np.array([[r["what"].probs[x] for x in labels] for r in results])


def _hailo(model, images, labels):
    ps = PromptSet.from_texts(labels, text_prefix="")
    encode_entries(ps, model.encode_texts)
    probs, indices = match_probabilities(model.encode_images(images), ps, model)
    assert indices == [0, 1, 2]
    return probs


def _show_pred(model, images, labels):
    out = FramePredictor(model, labels).format(model.encode_images(images))
    rows = re.findall(r"^ *-?\d+\.\d{3} \| (\d\.\d{3}) \| (.+)$", out, re.M)
    per_frame = [dict((label, float(p)) for p, label in rows[i : i + 3]) for i in range(0, len(rows), 3)]
    return np.array([[frame[x] for x in labels] for frame in per_frame])


# (scorer, whether it scores at the family's shared scale, tolerance of its output)
SCORERS = [
    pytest.param(_classify, False, 1e-5, id="classify"),
    pytest.param(_categories, True, 1e-5, id="interrogate categories"),
    pytest.param(_hailo, True, 1e-5, id="hailo matching"),
    pytest.param(_show_pred, False, 6e-4, id="video show-pred"),
]


@pytest.mark.parametrize(("scorer", "shared", "tolerance"), SCORERS)
def test_every_scorer_uses_the_models_family(scored_model, photos, scorer, shared, tolerance) -> None:
    images = photos[:2]
    cos = ops.cosine(scored_model.encode_images(images), scored_model.encode_texts(LABELS))
    family = scored_model.family
    scale = family.shared_scale if shared and family.shared_scale is not None else scored_model.logit_scale
    expected = family.probabilities(cos, scale, scored_model.logit_bias)
    np.testing.assert_allclose(scorer(scored_model, images, LABELS), expected, atol=tolerance)


def test_shared_scale_is_clips_100_or_the_bundles_own() -> None:
    clip = Scoring(ClipFamily(), 10.0)
    assert clip.shared().logit_scale == 100.0 and clip.logit_scale == 10.0
    sigmoid = Scoring(BiasedSigmoid(), 10.0, -2.0)
    assert sigmoid.shared() == sigmoid
    # A stand-in without a family or scale (tests' fakes) scores as CLIP does.
    fake = Scoring.of(object())
    assert isinstance(fake.family, ClipFamily) and (fake.logit_scale, fake.logit_bias) == (100.0, None)
