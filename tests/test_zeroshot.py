"""Zero-shot classification, tag interrogation, the tag-embedding cache and structured categories."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from clipworks import labelbank, zeroshot
from clipworks.cli.main import main
from clipworks.errors import UsageError
from clipworks.labelbank import LabelBank
from clipworks.zeroshot import CategorySet, TagIndex


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "home"))


def unit(*rows: list[float]) -> np.ndarray:
    a = np.asarray(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# -- classify -------------------------------------------------------------------------------------


def test_classify_is_softmax_of_scaled_cosine_best_first(model, photos) -> None:
    labels = ["dog", "cat", "car", "tree"]
    rows = zeroshot.classify(model, photos[:2], labels, top_k=None)
    img = model.encode_images(photos[:2])
    txt = model.encode_texts([f"a photo of a {x}." for x in labels])
    logits = model.logit_scale * img @ txt.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for r, row in enumerate(rows):
        assert [s.label for s in row] == [labels[i] for i in np.argsort(-logits[r])]
        got = {s.label: (s.logit, s.prob) for s in row}
        for i, lab in enumerate(labels):
            assert got[lab] == pytest.approx((logits[r, i], probs[r, i]), abs=1e-4)
        assert sum(s.prob for s in row) == pytest.approx(1.0, abs=1e-5)
    assert len(zeroshot.classify(model, photos[:1], labels, top_k=2)[0]) == 2


@pytest.mark.parametrize(
    ("labels", "template", "message"),
    [
        ([], "a {}", "at least one label"),
        (["dog", ""], "a {}", "no empty ones"),
        (["dog", "dog"], "a {}", "duplicate labels"),
        (["dog"], "a photo", "has no '{}'"),
    ],
)
def test_classify_refuses_bad_labels(model, photos, labels, template, message) -> None:
    with pytest.raises(UsageError, match=message):
        zeroshot.classify(model, photos[:1], labels, template=template)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_classify_prints_video_features_table(capsys, vit_bundle, photos) -> None:
    code, out, err = run(capsys, "classify", photos[0], "--labels", "a dog", "a cat", "a car", "-m", vit_bundle)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(photos[0])
    assert lines[1] == "  Logits | Prob. | Label "
    rows = [re.fullmatch(r"( *-?\d+\.\d{3}) \| (\d\.\d{3}) \| (.+)", line) for line in lines[2:]]
    assert all(rows) and len(rows) == 3, out
    assert sorted(m.group(3) for m in rows) == ["a car", "a cat", "a dog"]
    assert all(len(m.group(1)) == 8 for m in rows)
    logits = [float(m.group(1)) for m in rows]
    assert logits == sorted(logits, reverse=True)
    assert sum(float(m.group(2)) for m in rows) == pytest.approx(1.0, abs=3e-3)


def test_cli_classify_json_and_labels_file(capsys, vit_bundle, photos, tmp_path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# animals\ndog\ncat\n\nbird\n")
    code, out, err = run(capsys, "classify", *photos[:2], "--labels-file", labels, "--top-k", "2", "--json",
                         "-m", vit_bundle)  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert [d["image"] for d in data] == [str(p) for p in photos[:2]]
    assert all(len(d["results"]) == 2 and {"label", "logit", "prob"} <= d["results"][0].keys() for d in data)
    assert {r["label"] for d in data for r in d["results"]} <= {"dog", "cat", "bird"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--labels or --labels-file"),
        (["--labels", "dog", "missing.jpg"], "missing.jpg does not exist"),
        (["--labels", "dog", "--template", "photo"], "has no '{}'"),
    ],
)
def test_cli_classify_usage_errors(capsys, vit_bundle, photos, extra, message) -> None:
    code, _, err = run(capsys, "classify", photos[0], *extra, "-m", vit_bundle)
    assert code == 2 and message in err, err


# -- interrogate ----------------------------------------------------------------------------------


def test_interrogate_caption_is_tags_over_threshold_best_first_capped() -> None:
    tags = ["red", "green", "blue", "black"]
    index = TagIndex(LabelBank(tags, unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1])))
    image = unit([0.5, 0.9, 0.1, 0.0], [0.0, 0.05, 0.1, 1.0])
    first, second = index.interrogate(image, threshold=0.22, top=10)
    assert first.caption == "green, red"
    assert [t.tag for t in first.tags] == ["green", "red"]
    assert first.tags[0].score == pytest.approx(float(image[0, 1]))
    # Only one tag passes in the second image.
    assert second.caption == "black"
    assert index.interrogate(image[:1], threshold=0.22, top=1)[0].caption == "green"


def test_interrogate_falls_back_to_the_single_best_tag() -> None:
    index = TagIndex(LabelBank(["a", "b"], unit([1, 0], [0, 1])))
    (result,) = index.interrogate(unit([0.1, 0.2]), threshold=0.99)
    assert result.caption == "b" and len(result.tags) == 1


def test_tag_embeddings_are_cached_on_disk_by_model_template_and_tags(model, tmp_path) -> None:
    calls: list[int] = []

    def encode(texts):
        calls.append(len(texts))
        return model.encode_texts(texts)

    tags = ["dog", "cat", "oil painting"]
    first = TagIndex.build(model, tags, cache_dir=tmp_path, encode=encode)
    again = TagIndex.build(model, tags, cache_dir=tmp_path, encode=encode)
    assert calls == [3] and not first.bank.from_cache and again.bank.from_cache
    np.testing.assert_array_equal(first.bank.matrix, again.bank.matrix)
    np.testing.assert_allclose(first.bank.matrix, model.encode_texts(tags), atol=1e-6)
    # Another template or another tag list is another key; the same inputs are the same key.
    TagIndex.build(model, tags, template="a photo of {}", cache_dir=tmp_path, encode=encode)
    TagIndex.build(model, [*tags, "bird"], cache_dir=tmp_path, encode=encode)
    assert calls == [3, 3, 4]
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert labelbank.cache_key(model, ["{}"], tags) == first.bank.cache_path.stem


def test_tag_cache_rejects_a_damaged_file(model, tmp_path) -> None:
    index = TagIndex.build(model, ["dog", "cat"], cache_dir=tmp_path)
    index.bank.cache_path.write_bytes(b"not numpy")
    rebuilt = TagIndex.build(model, ["dog", "cat"], cache_dir=tmp_path)
    assert not rebuilt.bank.from_cache
    np.testing.assert_allclose(rebuilt.bank.matrix, index.bank.matrix, atol=1e-6)
    np.save(rebuilt.bank.cache_path, np.zeros((5, 32), np.float32))  # wrong row count
    assert not TagIndex.build(model, ["dog", "cat"], cache_dir=tmp_path).bank.from_cache


def test_cache_key_follows_the_model_graph(model, vit_bundle, tmp_path) -> None:
    import shutil

    import clipworks

    copy = tmp_path / "copy"
    shutil.copytree(vit_bundle, copy)
    other = clipworks.load(copy)
    assert labelbank.cache_key(model, ["{}"], ["a"]) != labelbank.cache_key(other, ["{}"], ["a"])


def test_imagenet_vocabulary_ships() -> None:
    tags = zeroshot.vocabulary("imagenet1k")
    assert len(tags) > 990 and len(set(tags)) == len(tags)
    assert tags[:2] == ["tench", "goldfish"]
    with pytest.raises(UsageError, match="unknown"):
        zeroshot.vocabulary("imagenet21k")


def test_cli_interrogate_with_categories(capsys, vit_bundle, photos, tmp_path) -> None:
    tags = tmp_path / "tags.txt"
    tags.write_text("dog\ncat\nbuilding\nfruit\nmonkey\n")
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"colour": ["red", "green", "blue"], "age": ["child", "adult"]}))
    args = ["interrogate", *photos[:2], "--tags-file", tags, "--categories", cats, "-m", vit_bundle]
    code, out, err = run(capsys, *args, "--json", "--threshold", "-1")
    assert code == 0, err
    assert "5 tags cached in" in err
    data = json.loads(out)
    for item in data:
        scores = [t["score"] for t in item["interrogations"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5  # threshold -1: all pass
        assert item["caption"] == ", ".join(t["tag"] for t in item["interrogations"])
        assert item["results"]["colour"]["winner"] in {"red", "green", "blue"}
        assert 1 / 3 <= item["results"]["colour"]["confidence"] <= 1
    code, out, err = run(capsys, *args, "--top", "2")
    assert code == 0 and "5 tags read from" in err
    assert out.splitlines()[0].startswith(f"{photos[0]}: ")
    assert re.search(r"^  colour: (red|green|blue) \(\d\.\d{3}\)$", out, re.M)


# -- structured -----------------------------------------------------------------------------------


def test_categories_give_a_winner_and_probabilities_summing_to_one(model, photos) -> None:
    cats = CategorySet.build(model, {"colour": ["red", "green", "blue"], "age": ["child", "adult", "senior"]})
    emb = model.encode_images(photos[:3])
    results = cats.evaluate(emb)
    for r, per_image in enumerate(results):
        for name, res in per_image.items():
            assert sum(res.probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert res.winner == max(res.probs, key=res.probs.get)
            assert res.confidence == res.probs[res.winner]
            cos = emb[r] @ model.encode_texts([f"a photo of a {x}." for x in cats.categories[name]]).T
            expect = np.exp(100 * (cos - cos.max()))
            np.testing.assert_allclose(list(res.probs.values()), expect / expect.sum(), atol=1e-4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "non-empty object"),
        ([], "non-empty object"),
        ({}, "non-empty object"),
        ({"age": "child"}, "non-empty list"),
        ({"age": []}, "non-empty list"),
        ({"age": ["child", 3]}, "non-empty list"),
        ({"age": ["child", "child"]}, "duplicate"),
    ],
)
def test_parse_categories_refuses_bad_shapes(data, message) -> None:
    with pytest.raises(UsageError, match=message):
        zeroshot.parse_categories(data)
