"""Prompt files (Hailo's CLIP app format) and Hailo's matching rules."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipworks.errors import BadPromptFile
from clipworks.prompts import (
    DEFAULT_ENSEMBLE_TEMPLATE,
    PromptEntry,
    PromptSet,
    combine_embeddings,
    encode_entries,
    entry_texts_for_encoding,
    match,
    match_probabilities,
)

HAILO_FILES = ["embeddings.json", "example_embeddings.json"]


def hailo_file(test_data: Path, name: str) -> Path:
    return test_data / "hailo" / name


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def float_bits(data: object) -> list[bytes]:
    """Every float in a parsed JSON document, as its 8 IEEE bytes, in document order."""
    out: list[bytes] = []

    def walk(x: object) -> None:
        if isinstance(x, float):
            out.append(struct.pack("<d", x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    return out


# -- Hailo's real files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "texts", "negatives"),
    [
        ("embeddings.json", ["empty room", "person", "keyboard", "cup", "", ""], [0]),
        (
            "example_embeddings.json",
            ["desk", "keyboard", "spinner", "Raspberry Pi", "Unicorn mouse pad", "Xenomorph"],
            [],
        ),
    ],
)
def test_hailo_file_loads(test_data: Path, name: str, texts: list[str], negatives: list[int]) -> None:
    ps = PromptSet.load(hailo_file(test_data, name))
    assert len(ps.entries) == 6
    assert [e.text for e in ps.entries] == texts
    assert [i for i, e in enumerate(ps.entries) if e.negative] == negatives
    assert all(e.embedding is not None and e.embedding.shape == (640,) for e in ps.entries)
    assert ps.dim == 640
    assert ps.threshold == 0.5
    assert ps.text_prefix == "A photo of a "
    assert ps.ensemble_template == list(DEFAULT_ENSEMBLE_TEMPLATE)
    assert ps.extra == {}
    assert ps.source == hailo_file(test_data, name)


@pytest.mark.parametrize("name", HAILO_FILES)
def test_hailo_file_round_trips_without_loss(test_data: Path, tmp_path: Path, name: str) -> None:
    src = hailo_file(test_data, name)
    out = PromptSet.load(src).save(tmp_path / name)
    original, saved = json.loads(src.read_text()), json.loads(out.read_text())
    assert saved == original
    assert float_bits(saved) == float_bits(original)
    # Hailo writes json.dump's default layout; so do we, so the bytes come back too.
    assert out.read_bytes() == src.read_bytes()
    assert PromptSet.load(out) == PromptSet.load(src)


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    doc = {
        "threshold": 0.25,
        "text_prefix": "A picture of ",
        "ensemble_template": ["{} in a photo"],
        "entries": [
            {"text": "cat", "embedding": [0.1, -0.2, 1e-300], "negative": False, "ensemble": False, "id": 7},
            {"text": "", "embedding": [], "negative": False, "ensemble": False},
        ],
        "model": "RN50x4",
        "notes": {"by": "someone"},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    ps = PromptSet.load(path)
    assert ps.extra == {"model": "RN50x4", "notes": {"by": "someone"}}
    assert ps.entries[0].extra == {"id": 7}
    assert ps.entries[1].embedding is None
    ps.save()
    assert json.loads(path.read_text()) == doc


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.json"
    PromptSet.from_texts(["cat"]).save(path)
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BadPromptFile, match="No space left"):
        PromptSet.from_texts(["dog"]).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing" / "p.json", "cannot write"),
        (lambda tmp: None, "no path to save to"),
    ],
)
def test_save_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(BadPromptFile, match=message):
        PromptSet.from_texts(["cat"]).save(make(tmp_path))


def test_save_refuses_nan(tmp_path: Path) -> None:
    ps = PromptSet([PromptEntry("cat", [np.nan, 1.0])])
    with pytest.raises(BadPromptFile, match="NaN"):
        ps.save(tmp_path / "p.json")
    assert not list(tmp_path.iterdir())


# -- bad files ---------------------------------------------------------------------------------

GOOD_ENTRY = {"text": "cat", "embedding": [0.6, 0.8], "negative": False, "ensemble": False}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        # Good rows: the smallest files that load.
        ('{"entries": []}', None),
        (json.dumps({"entries": [{"text": "cat"}]}), None),
        (json.dumps({"entries": [{"text": "", "embedding": []}]}), None),
        (json.dumps({"threshold": 1, "entries": [GOOD_ENTRY]}), None),
        # Bad rows.
        ("", "not valid JSON"),
        ('{"entries": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('"text"', "expected a JSON object"),
        ('{"threshold": 0.5}', "no 'entries' key"),
        ('{"entries": {}}', "'entries' must be a list"),
        ('{"entries": ["cat"]}', r"entries\[0\] must be an object"),
        ('{"entries": [{"embedding": [0.1]}]}', r"entries\[0\] has no 'text' key"),
        ('{"entries": [{"text": 3}]}', r"entries\[0\].text must be a text"),
        ('{"entries": [{"text": "a", "embedding": "0.1,0.2"}]}', r"embedding must be a list of numbers"),
        ('{"entries": [{"text": "a", "embedding": {"0": 0.1}}]}', r"embedding must be a list of numbers"),
        ('{"entries": [{"text": "a", "embedding": [0.1, "0.2"]}]}', r"embedding\[1\] must be a number"),
        ('{"entries": [{"text": "a", "embedding": [0.1, true]}]}', r"embedding\[1\] must be a number"),
        ('{"entries": [{"text": "a", "embedding": [[0.1]]}]}', r"embedding\[0\] must be a number"),
        ('{"entries": [{"text": "a", "embedding": [0.1, NaN]}]}', r"embedding\[1\] is nan"),
        ('{"entries": [{"text": "a", "negative": "yes"}]}', r"entries\[0\].negative must be true or false"),
        ('{"entries": [{"text": "a", "ensemble": 1}]}', r"entries\[0\].ensemble must be true or false"),
        ('{"threshold": "0.5", "entries": []}', "'threshold' must be a finite number"),
        ('{"threshold": Infinity, "entries": []}', "'threshold' must be a finite number"),
        ('{"text_prefix": null, "entries": []}', "'text_prefix' must be a text"),
        ('{"ensemble_template": "a {}", "entries": []}', "'ensemble_template' must be a list"),
        ('{"ensemble_template": ["a photo"], "entries": []}', r"ensemble_template\[0\]"),
        ('{"ensemble_template": ["a {name}"], "entries": []}', r"ensemble_template\[0\]"),
        ('{"model": 3, "entries": []}', "'model' must name the model the file was made for"),
        ('{"model": " ", "entries": []}', "'model' must name the model the file was made for"),
        ('{"model": "RN50x4::openai", "entries": []}', None),
    ],
)
def test_load_validates(tmp_path: Path, content: str, error: str | None) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(content)
    if error is None:
        assert isinstance(PromptSet.load(path), PromptSet)
        return
    with pytest.raises(BadPromptFile, match=error) as info:
        PromptSet.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def latin1_file(tmp: Path) -> Path:
    path = tmp / "latin1.json"
    path.write_bytes(b'{"entries": [{"text": "caf\xe9"}]}')
    return path


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda tmp: tmp / "nope.json", "no such file"),
        (lambda tmp: tmp, "is a folder"),
        (latin1_file, "UTF-8"),
    ],
)
def test_load_unreadable(tmp_path: Path, make, error: str) -> None:
    path = make(tmp_path)
    with pytest.raises(BadPromptFile, match=error) as info:
        PromptSet.load(path)
    assert str(path) in str(info.value)


# -- texts json (Hailo's --texts-json) ---------------------------------------------------------


def test_texts_json_example(test_data: Path) -> None:
    ps = PromptSet.from_texts_json(hailo_file(test_data, "texts_json_example.json"))
    assert [(e.text, e.negative) for e in ps.entries] == [
        ("keyboard", False),
        ("mouse", False),
        ("cat", False),
        ("dog", False),
        ("person", True),
        ("", False),  # padded to Hailo's six GUI slots
    ]
    assert all(e.embedding is None for e in ps.entries)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"positive": ["cat"], "negative": []}', None),
        ('{"positive": ["cat"]}', None),
        ('{"negative": ["dog"]}', None),
        ("[]", "expected a JSON object"),
        ("{}", "no 'positive' or 'negative' list"),
        ('{"positive": "cat"}', "'positive' must be a list"),
        ('{"positive": ["cat", 3]}', r"positive\[1\] must be a non-empty text"),
        ('{"negative": [" "]}', r"negative\[0\] must be a non-empty text"),
        ('{"positive": ["cat"], "negatve": ["dog"]}', "unknown key"),
        ("{positive: []}", "not valid JSON"),
    ],
)
def test_texts_json_validates(tmp_path: Path, content: str, error: str | None) -> None:
    path = tmp_path / "texts.json"
    path.write_text(content)
    if error is None:
        assert PromptSet.from_texts_json(path).entries[0].text in {"cat", "dog"}
        return
    with pytest.raises(BadPromptFile, match=error) as info:
        PromptSet.from_texts_json(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("positive", "negative", "slots", "texts"),
    [
        (["a"], ["b"], 6, ["a", "b", "", "", "", ""]),
        (["a"], [], 0, ["a"]),
        ([f"t{i}" for i in range(8)], [], 6, [f"t{i}" for i in range(8)]),  # never truncated
    ],
)
def test_from_texts(positive: list[str], negative: list[str], slots: int, texts: list[str]) -> None:
    ps = PromptSet.from_texts(positive, negative, slots=slots)
    assert [e.text for e in ps.entries] == texts
    assert [e.negative for e in ps.entries[: len(positive) + len(negative)]] == [False] * len(positive) + [True] * len(
        negative
    )


# -- matching rules ----------------------------------------------------------------------------

E0, E1, E2 = np.eye(3)


@pytest.mark.parametrize(
    ("entries", "image", "threshold", "best", "passed", "active"),
    [
        # argmax picks the closest positive, well above the threshold
        ([("a", E0, False), ("b", E1, False)], E0, 0.8, 0, True, [0, 1]),
        ([("a", E0, False), ("b", E1, False)], 3 * E1, 0.8, 1, True, [0, 1]),
        # an empty text never takes part, even with an embedding that matches perfectly
        ([("", E0, False), ("b", E1, False), ("c", E2, False)], E0, 0.4, 1, True, [1, 2]),
        # a text without an embedding (not encoded yet) does not take part either
        ([("a", None, False), ("b", E1, False), ("c", E2, False)], E1, 0.8, 1, True, [1, 2]),
        # a negative can win the argmax, and then nothing passes
        ([("a", E0, True), ("b", E1, False)], E0, 0.0, 0, False, [0, 1]),
        # a tie gives exactly 0.5 each: the first wins, and 0.5 is not strictly above 0.5
        ([("a", E0, False), ("b", E1, False)], unit(1, 1, 0), 0.5, 0, False, [0, 1]),
        ([("a", E0, False), ("b", E1, False)], unit(1, 1, 0), 0.49, 0, True, [0, 1]),
        # a single entry always has probability 1 (softmax over one), yet 1.0 > 1.0 is false
        ([("a", E0, False)], E1, 0.99, 0, True, [0]),
        ([("a", E0, False)], E1, 1.0, 0, False, [0]),
    ],
)
def test_match_rules(entries, image, threshold: float, best: int, passed: bool, active: list[int]) -> None:
    ps = PromptSet([PromptEntry(t, e, negative=n) for t, e, n in entries], threshold=threshold)
    (result,) = match(image, ps)
    assert result.best_index == best
    assert result.text == entries[best][0]
    assert result.negative == entries[best][2]
    assert result.passed is passed
    assert sorted(result.probabilities) == active
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.probability == max(result.probabilities.values())


def test_negatives_take_part_in_the_softmax() -> None:
    # "a" is the closest entry, with the negative "n" just behind it
    image = unit(1, 0.995, 0)
    alone = PromptSet([PromptEntry("a", E0), PromptEntry("b", E2)], threshold=0.7)
    with_negative = PromptSet(
        [PromptEntry("a", E0), PromptEntry("b", E2), PromptEntry("n", E1, negative=True)], threshold=0.7
    )
    p_alone = match(image, alone)[0]
    p_neg = match(image, with_negative)[0]
    assert p_alone.best_index == 0 and p_alone.passed and p_alone.probability > 0.99
    # the negative takes its share of the softmax, so "a" is still best but drops below the threshold
    assert p_neg.best_index == 0 and not p_neg.passed
    assert 0.5 < p_neg.probabilities[0] < 0.7
    assert p_neg.probabilities[2] == pytest.approx(1 - p_neg.probabilities[0] - p_neg.probabilities[1])


def test_match_reproduces_hand_computed_probabilities(test_data: Path) -> None:
    path = hailo_file(test_data, "embeddings.json")
    ps = PromptSet.load(path)
    raw = json.loads(path.read_text())
    rng = np.random.default_rng(0)
    target = 2  # "keyboard"
    images = np.stack(
        [
            np.asarray(raw["entries"][target]["embedding"]) + rng.normal(0, 0.02, 640),
            rng.normal(0, 1, 640),
        ]
    ).astype(np.float32)

    # Hailo's match() by hand: only non-empty texts, exp(100 * dot) normalised, over all of them.
    valid = [i for i, e in enumerate(raw["entries"]) if e["text"] != ""]
    text = np.array([raw["entries"][i]["embedding"] for i in valid])
    x = images.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.exp(100 * x @ text.T)
    expected /= expected.sum(axis=1, keepdims=True)

    probs, indices = match_probabilities(images, ps)
    assert indices == valid == [0, 1, 2, 3]
    np.testing.assert_allclose(probs, expected, rtol=1e-12, atol=0)
    results = match(images, ps)
    assert [r.row for r in results] == [0, 1]
    assert results[0].best_index == target and results[0].text == "keyboard"
    assert results[0].passed == (expected[0, target] > 0.5)
    for r, row in zip(results, expected, strict=True):
        assert r.probabilities == pytest.approx(dict(zip(valid, row.tolist(), strict=True)), rel=1e-12)
        assert r.best_index == valid[int(row.argmax())]
    # one row at a time gives the same as the batch, and a 1-D embedding is one row
    assert match(images[1], ps)[0].probabilities == pytest.approx(results[1].probabilities, rel=1e-12)


def test_match_does_not_overflow_on_near_identical_vectors() -> None:
    # exp(100 * 0.99) overflows float32; the shifted softmax does not.
    ps = PromptSet([PromptEntry("a", unit(1, 0.01, 0)), PromptEntry("b", unit(1, 0, 0.01))])
    probs, _ = match_probabilities(np.array([1, 0, 0], dtype=np.float32), ps)
    assert np.isfinite(probs).all()
    assert probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("entries", "image_dim", "error"),
    [
        ([("a", np.ones(4))], 4, None),
        ([("a", np.ones(640))], 512, "dimension 640 but the image embeddings have dimension 512"),
        ([("a", np.ones(4)), ("b", np.ones(5))], 4, r"different dimensions \(4, 5\)"),
        # an empty slot with a stale embedding of another size does not matter
        ([("a", np.ones(4)), ("", np.ones(5))], 4, None),
        ([("", np.ones(4)), ("a", None)], 4, "no entry has both a text and an embedding"),
    ],
)
def test_match_dimension_checks(tmp_path: Path, entries, image_dim: int, error: str | None) -> None:
    path = tmp_path / "prompts.json"
    PromptSet([PromptEntry(t, e) for t, e in entries]).save(path)
    ps = PromptSet.load(path)
    image = np.ones(image_dim, dtype=np.float32)
    if error is None:
        assert len(match(image, ps)) == 1
        return
    with pytest.raises(BadPromptFile, match=error) as info:
        match(image, ps)
    assert str(info.value).startswith(f"{path}: ")
    assert "clipworks embed texts" in str(info.value)


def test_dimension_error_without_a_file() -> None:
    with pytest.raises(BadPromptFile, match=r"^prompt set: .*640.*512"):
        match(np.ones((2, 512)), PromptSet([PromptEntry("a", np.ones(640))]))


# -- encoding and ensembles --------------------------------------------------------------------


def fake_encoder(dim: int = 8):
    """A deterministic encode_texts: one unit float32 row per text, seeded by the text; counts calls."""
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        rows = [np.random.default_rng(sum(t.encode())).normal(size=dim) for t in texts]
        rows = np.asarray(rows, dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    encode.calls = calls  # type: ignore[attr-defined]
    return encode


@pytest.mark.parametrize(
    ("ensemble", "texts"),
    [
        (False, ["A photo of a cat"]),
        (True, [t.format("cat") for t in DEFAULT_ENSEMBLE_TEMPLATE]),
    ],
)
def test_entry_texts_for_encoding(ensemble: bool, texts: list[str]) -> None:
    entry = PromptEntry("cat", ensemble=ensemble)
    assert entry_texts_for_encoding(entry, PromptSet([entry])) == texts


def test_combine_embeddings_is_the_unrenormalised_mean() -> None:
    rows = np.array([[3, 4, 0], [0, 0, 2]], dtype=np.float32)
    got = combine_embeddings(PromptEntry("cat", ensemble=True), rows)
    assert got.dtype == np.float32
    # Hailo: mean of the normalised rows, *not* normalised again
    np.testing.assert_array_equal(got, np.array([0.3, 0.4, 0.5], dtype=np.float32))
    assert np.linalg.norm(got) < 1
    single = combine_embeddings(PromptEntry("cat"), np.array([[0, 2, 0]], dtype=np.float32))
    np.testing.assert_array_equal(single, [0, 1, 0])
    with pytest.raises(ValueError, match="not an ensemble"):
        combine_embeddings(PromptEntry("cat"), rows)


def test_encode_entries_in_one_batch(tmp_path: Path) -> None:
    ps = PromptSet.from_texts(["cat"], ["dog"])
    ps.entries[1].ensemble = True
    encode = fake_encoder()
    done = encode_entries(ps, encode)
    assert done == [0, 1]
    assert encode.calls == [["A photo of a cat", *[t.format("dog") for t in DEFAULT_ENSEMBLE_TEMPLATE]]]
    np.testing.assert_array_equal(ps.entries[0].embedding, encode(["A photo of a cat"])[0])
    expected_dog = encode([t.format("dog") for t in DEFAULT_ENSEMBLE_TEMPLATE]).mean(axis=0)
    np.testing.assert_allclose(ps.entries[1].embedding, expected_dog, rtol=1e-6)
    assert all(e.embedding is None for e in ps.entries[2:])  # empty slots untouched
    assert ps.dim == 8

    # stored values are the float32 values, exactly, and survive a save/load
    assert np.array_equal(ps.entries[1].embedding.astype(np.float32).astype(np.float64), ps.entries[1].embedding)
    assert PromptSet.load(ps.save(tmp_path / "p.json")) == ps

    # only_missing re-encodes nothing once every text has an embedding
    ps.entries[2].text = "bird"
    calls_before = len(encode.calls)
    assert encode_entries(ps, encode, only_missing=True) == [2]
    assert encode.calls[calls_before:] == [["A photo of a bird"]]


def test_encode_entries_checks_the_encoder_output() -> None:
    with pytest.raises(ValueError, match="for 2 texts"):
        encode_entries(PromptSet.from_texts(["a", "b"]), lambda texts: np.ones((1, 4), np.float32))


def test_ensemble_entry_matches_like_hailo() -> None:
    ps = PromptSet.from_texts(["cat"], ["dog"], ensemble=True)
    encode = fake_encoder()
    encode_entries(ps, encode)
    image = encode(["a photo of a cat."])[0]
    text = np.stack([ps.entries[0].embedding, ps.entries[1].embedding])
    x = image / np.linalg.norm(image)
    expected = np.exp(100 * text @ x)
    expected /= expected.sum()
    (result,) = match(image, ps)
    assert result.probabilities == pytest.approx({0: expected[0], 1: expected[1]}, rel=1e-9)


def test_module_imports_only_numpy() -> None:
    code = "import sys, clipworks.prompts; print([m for m in ('torch', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the model a file was made for, and adding entries (Hailo's update_text_entries) ----------------


@pytest.mark.parametrize("name", ["embeddings.json", "example_embeddings.json"])
def test_hailos_shipped_files_are_known_as_rn50x4(test_data: Path, name: str) -> None:
    ps = PromptSet.load(test_data / "hailo" / name)
    assert ps.dim == 640 and ps.made_for() == "RN50x4::openai"


def test_a_recorded_model_wins_and_other_dimensions_are_unknown(tmp_path: Path) -> None:
    ps = PromptSet.from_texts(["cat"])
    ps.entries[0].embedding = np.ones(32)
    assert ps.made_for() is None  # 32-d and nothing recorded: no guess
    ps.extra["model"] = "/bundles/tiny"
    assert PromptSet.load(ps.save(tmp_path / "p.json")).made_for() == "/bundles/tiny"


def test_add_entries_fills_empty_slots_first_then_appends(test_data: Path) -> None:
    ps = PromptSet.load(test_data / "hailo" / "embeddings.json")  # 4 texts, then 2 empty slots
    new = [PromptEntry(t, np.full(640, 0.01), negative=t == "dog") for t in ("cat", "dog", "bird")]
    ps.add_entries(new)
    assert [(e.text, e.negative) for e in ps.entries] == [
        ("empty room", True), ("person", False), ("keyboard", False), ("cup", False),
        ("cat", False), ("dog", True), ("bird", False),
    ]  # fmt: skip


def test_add_entries_of_another_dimension_is_refused_and_changes_nothing(test_data: Path) -> None:
    path = test_data / "hailo" / "embeddings.json"
    ps = PromptSet.load(path)
    before = [e.text for e in ps.entries]
    with pytest.raises(BadPromptFile, match=r"640-d but the new ones are 512-d.*--model RN50x4::openai"):
        ps.add_entries([PromptEntry("cat", np.full(640, 0.1)), PromptEntry("dog", np.full(512, 0.1))])
    assert [e.text for e in ps.entries] == before
