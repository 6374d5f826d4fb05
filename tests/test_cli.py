"""The clipworks command as a user runs it: output files, messages, exit codes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from conftest import MODEL_CONFIGS


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path: Path, photos) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for p in photos[:4]:
        shutil.copy(p, d / p.name)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return d


def test_embed_images_writes_sophgo_pkl_and_skips_bad_files(capsys, vit_bundle, folder, tmp_path) -> None:
    out = tmp_path / "embeddings.pkl"
    code, _, err = run(capsys, "embed", "images", folder, "-o", out, "--model", vit_bundle, "--batch-size", "3")
    assert code == 0, err
    data = pickle.loads(out.read_bytes())
    assert len(data["img_path"]) == 4 and not any("broken" in p for p in data["img_path"])
    np.testing.assert_allclose(np.linalg.norm(np.stack(data["embedding"]), axis=1), 1.0, atol=1e-5)
    assert "warning: skipped" in err and "broken.jpg" in err
    assert "embedded 4 images, 1 skipped" in err and "images/s" in err


def test_embed_images_npy_and_parquet(capsys, vit_bundle, folder, tmp_path) -> None:
    for name in ("e.npy", "e.parquet"):
        code, _, err = run(capsys, "embed", "images", folder, "-o", tmp_path / name, "-m", vit_bundle)
        assert code == 0, err
    assert len(json.loads((tmp_path / "e.paths.json").read_text())["paths"]) == 4
    assert np.load(tmp_path / "e.npy").shape == (4, 32)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["embed", "images", "{empty}", "-o", "{tmp}/e.pkl"], 2, "no images found in"),
        (["embed", "images", "{tmp}/nowhere", "-o", "{tmp}/e.pkl"], 2, "nowhere does not exist"),
        (["embed", "images", "{folder}", "-o", "{tmp}/e.csv"], 2, "must end in .pkl, .npy, .parquet"),
        (
            ["embed", "images", "{folder}", "-o", "{tmp}/e.pkl", "-m", "ViT-B/33"],
            1,
            "unknown model 'ViT-B/33'",
        ),
        (
            ["embed", "images", "{folder}", "-o", "{tmp}/e.pkl", "-m", "{half}"],
            1,
            "visual/model.onnx is missing",
        ),
        (["embed", "images", "{only_bad}", "-o", "{tmp}/e.pkl"], 1, "none of the 1 files could be read"),
        (["embed", "texts", "-o", "{tmp}/t.json"], 2, "exactly one of them"),
        (["embed", "texts", "a", "--texts-list", "b", "-o", "{tmp}/t.json"], 2, "exactly one of them"),
        (["embed", "texts", "a", "--for", "sophgo", "-o", "{tmp}/t.json"], 2, "--for must be hailo"),
        (["embed", "texts", "a", "--append"], 2, "--append needs -o FILE"),
        (["embed", "texts", "a", "--append", "-o", "{tmp}/none.json"], 2, "no such file; drop --append"),
        (["embed", "texts", "a", "--threshold", "2", "-o", "{tmp}/t.json"], 2, "between 0 and 1"),
        (["embed", "texts", "--texts-json", "{tmp}/nope.json"], 1, "nope.json"),
        (["export", "ViT-Q-1", "--out", "{tmp}/x", "--pretrained", "random"], 1, "no architecture 'ViT-Q-1'"),
    ],
)
def test_bad_input_gets_one_line_and_an_exit_code(capsys, vit_bundle, folder, tmp_path, args, code, message) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.jpg").write_bytes(b"")
    half = tmp_path / "half"
    shutil.copytree(vit_bundle, half)
    (half / "visual" / "model.onnx").unlink()
    values = {"tmp": tmp_path, "empty": tmp_path / "empty", "folder": folder, "half": half,
              "only_bad": tmp_path / "only_bad"}  # fmt: skip
    argv = [a.format(**values) for a in args]
    if "-m" not in argv and argv[0] == "embed":
        argv += ["-m", str(vit_bundle)]
    got, _, err = run(capsys, *argv)
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "e.pkl").exists()


def test_embed_texts_writes_a_hailo_file_and_matches_an_image(capsys, vit_bundle, photos, tmp_path) -> None:
    out = tmp_path / "prompts.json"
    code, stdout, err = run(
        capsys, "embed", "texts", "fruit", "a baboon", "-n", "a person", "-o", out, "-m", vit_bundle,
        "--image-path", photos[0],
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    # Hailo's four keys, and the model beside them (Hailo's loader reads only its own).
    assert set(data) == {"threshold", "text_prefix", "ensemble_template", "entries", "model"}
    assert data["model"] == str(vit_bundle.resolve())
    texts = [(e["text"], e["negative"]) for e in data["entries"]]
    assert texts[:3] == [("fruit", False), ("a baboon", False), ("a person", True)]
    assert len(data["entries"]) == 6 and len(data["entries"][0]["embedding"]) == 32
    assert "best:" in stdout


def test_embed_texts_from_hailo_texts_json(capsys, vit_bundle, test_data, tmp_path) -> None:
    out = tmp_path / "t.json"
    code, _, err = run(
        capsys, "embed", "texts", "--texts-json", test_data / "hailo" / "texts_json_example.json", "-o", out,
        "-m", vit_bundle,
    )  # fmt: skip
    assert code == 0, err
    entries = json.loads(out.read_text())["entries"]
    assert [e["text"] for e in entries if e["negative"]] == ["person"]


def test_prompt_file_of_another_dimension_is_refused_when_matched(capsys, vit_bundle, test_data, photos) -> None:
    import clipworks
    from clipworks.errors import BadPromptFile
    from clipworks.prompts import PromptSet, match

    hailo = PromptSet.load(test_data / "hailo" / "embeddings.json")  # RN50x4, 640-d
    with pytest.raises(BadPromptFile, match="640 but the image embeddings have dimension 32"):
        match(clipworks.load(vit_bundle).encode_images(photos[:1]), hailo)


def test_export_command_from_a_checkpoint_file_and_models_info(capsys, tmp_path, source_model) -> None:
    """A user's OpenAI-format checkpoint (as video_features' CLIP-custom.pth), which open_clip rebuilds from the
    state dict alone (its own choice of layers): the command exports it and checks it against open_clip."""
    import torch

    from clipworks.models.bundle import load_bundle

    checkpoint = tmp_path / "CLIP-custom.pth"
    torch.save(source_model("tiny-vit").model.state_dict(), checkpoint)
    out = tmp_path / "bundle"
    code, _, err = run(
        capsys, "export", MODEL_CONFIGS / "tiny-vit.json", "--out", out, "--pretrained", checkpoint,
        "--precision", "fp32",
    )  # fmt: skip
    assert code == 0, err
    code, stdout, err = run(capsys, "models", "info", out, "--json")
    info = json.loads(stdout)
    assert info["embed_dim"] == 32 and info["visual_precisions"] == ["fp32"]
    assert info["checks"]["fp32"]["visual_max_abs_diff"] <= 1e-4
    assert load_bundle(out).meta.pretrained == "CLIP-custom"


def test_models_list(capsys) -> None:
    code, stdout, _ = run(capsys, "models", "list", "--json")
    names = [r["name"] for r in json.loads(stdout)]
    assert code == 0 and "ViT-B-32::openai" in names and "RN50x4::openai" in names


def test_console_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "clipworks.cli.main", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.startswith("clipworks ")


def entry_rows(path: Path) -> list[tuple[str, bool]]:
    return [(e["text"], e["negative"]) for e in json.loads(path.read_text())["entries"]]


# Hailo's text_image_matcher main(): without --texts-json, texts_positive = [texts[0]], texts_negative =
# texts[1:], for --texts-list and --interactive alike; empty slots pad the file to six entries.
HAILO_ROWS = [("a dog", False), ("an empty room", True), ("a cat", True), ("", False), ("", False), ("", False)]


@pytest.mark.parametrize(
    ("args", "stdin", "rows"),
    [
        (["--texts-list", "a dog", "an empty room", "a cat"], "", HAILO_ROWS),
        (["--interactive"], "a dog\nan empty room\na cat\n\nnot read\n", HAILO_ROWS),
        # clipworks' own syntax beside them: all arguments positive, '-' marks a negative on stdin.
        (["a dog", "a cat", "-n", "an empty room"], "", [("a dog", False), ("a cat", False), ("an empty room", True)]),
        (["--stdin"], "a dog\n-an empty room\na cat\n\nnot read\n",
         [("a dog", False), ("a cat", False), ("an empty room", True)]),
    ],
)  # fmt: skip
def test_embed_texts_hailo_options_mean_what_hailos_do(capsys, vit_bundle, tmp_path, monkeypatch, args, stdin, rows):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = tmp_path / "t.json"
    code, _, err = run(capsys, "embed", "texts", *args, "-o", out, "-m", vit_bundle)
    assert code == 0, err
    assert entry_rows(out)[: len(rows)] == rows


def read_like_hailo(path: Path) -> list[tuple[str, bool, int]]:
    """Hailo's TextImageMatcher.load_embeddings reads exactly these keys (clip_app/text_image_matcher.py)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    _ = data["threshold"], data["text_prefix"], data["ensemble_template"]
    rows = []
    for e in data["entries"]:
        _ = e["ensemble"]
        rows.append((e["text"], e["negative"], len(np.array(e["embedding"]))))
    return rows


@pytest.fixture
def hailo_file(test_data: Path, tmp_path: Path) -> Path:
    """A copy of the embeddings.json Hailo's app ships (640-d RN50x4), to write to."""
    copy = tmp_path / "embeddings.json"
    shutil.copy(test_data / "hailo" / "embeddings.json", copy)
    return copy


@pytest.mark.parametrize(
    "args",
    [
        ["cat", "-o", "{hailo}"],  # replacing Hailo's file: its model
        ["cat", "--append", "-o", "{hailo}"],  # adding to it: its model
        ["cat", "--for", "hailo", "-o", "{tmp}/new.json"],  # a new file for Hailo's app
        # clipworks stream matches frames against Hailo's file: its image embeddings must be RN50x4's too.
        ["--", "stream", "--json-path", "{hailo}", "--input", "demo", "--max-frames", "1"],
        ["--", "stream", "--json-path", "{hailo}", "--disable-runtime-prompts", "--input", "demo", "--max-frames", "1"],
    ],
)
def test_a_hailo_target_is_encoded_with_rn50x4(capsys, hailo_file, tmp_path, monkeypatch, args) -> None:
    # No RN50x4 weights here (offline, empty cache): the error shows which model was chosen, and no file changes.
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    monkeypatch.delenv("CLIPWORKS_MODEL", raising=False)
    before = hailo_file.read_bytes()
    command = args[1:] if args[0] == "--" else ["embed", "texts", *args]
    code, _, err = run(capsys, *[a.format(hailo=hailo_file, tmp=tmp_path) for a in command])
    assert code == 1 and "RN50x4::openai is not downloaded" in err
    assert hailo_file.read_bytes() == before and not (tmp_path / "new.json").exists()


def test_appending_another_dimension_to_a_hailo_file_is_refused(capsys, vit_bundle, hailo_file) -> None:
    before = hailo_file.read_bytes()
    code, _, err = run(capsys, "embed", "texts", "cat", "--append", "-o", hailo_file, "-m", vit_bundle)
    assert code == 2
    assert "its prompts are 640-d (RN50x4::openai)" in err and "gives 32-d ones" in err
    assert "Use --model RN50x4::openai" in err
    assert hailo_file.read_bytes() == before


def test_for_hailo_refuses_a_model_of_another_dimension(capsys, vit_bundle, tmp_path) -> None:
    code, _, err = run(capsys, "embed", "texts", "cat", "--for", "hailo", "-m", vit_bundle, "-o", tmp_path / "n.json")
    assert code == 2 and "--for hailo needs 640-d embeddings" in err and not (tmp_path / "n.json").exists()


def test_the_file_records_its_model_and_later_runs_use_it(capsys, vit_bundle, rn_bundle, tmp_path, monkeypatch):
    import clipworks

    monkeypatch.delenv("CLIPWORKS_MODEL", raising=False)
    out = tmp_path / "prompts.json"
    code, _, err = run(capsys, "embed", "texts", "--texts-list", "a dog", "a cat", "-o", out, "-m", rn_bundle)
    assert code == 0, err
    assert json.loads(out.read_text())["model"] == str(rn_bundle.resolve())
    # No --model: the file's own model, not the default ViT-B/32; the new text fills the first empty slot.
    code, _, err = run(capsys, "embed", "texts", "a bird", "--append", "-o", out)
    assert code == 0, err
    assert f"the model {out} was made for" in err
    rows = read_like_hailo(out)
    assert rows[:4] == [("a dog", False, 32), ("a cat", True, 32), ("a bird", False, 32), ("", False, 0)]
    data = json.loads(out.read_text())
    want = clipworks.load(rn_bundle).encode_texts(["A photo of a a bird"])[0]
    np.testing.assert_array_equal(np.array(data["entries"][2]["embedding"], np.float32), want)
    # --model of the same dimension but another model still appends: the dimension is what Hailo matches on.
    code, _, err = run(capsys, "embed", "texts", "a fish", "--append", "-o", out, "-m", vit_bundle)
    assert code == 0, err


# File names a POSIX folder may hold: bytes that are not UTF-8, a newline, a tab, a quote.
ODD_NAMES = [b"\xff\xfe latin-1 \xe9.jpg", b"two\nlines.jpg", b"tab\there.jpg", b"it's.jpg"]


@pytest.fixture
def odd_folder(tmp_path: Path, photos) -> Path:
    d = tmp_path / "odd"
    d.mkdir()
    for raw, photo in zip([*ODD_NAMES, b"plain.jpg"], photos, strict=False):
        shutil.copy(photo, os.path.join(os.fsencode(d), raw))
    return d


@pytest.mark.parametrize("suffix", [".npy", ".pkl", ".parquet"])
def test_non_utf8_and_newline_names_through_embed(capsys, vit_bundle, odd_folder, tmp_path, suffix) -> None:
    import clipworks
    from clipworks.outputs import read_embeddings

    out = tmp_path / f"e{suffix}"
    code, _, err = run(capsys, "embed", "images", odd_folder, "-o", out, "-m", vit_bundle)
    assert code == 0, err
    paths, vectors = read_embeddings(out)
    assert sorted(os.path.basename(os.fsencode(p)) for p in paths) == sorted([*ODD_NAMES, b"plain.jpg"])
    # Each vector is still its own file's: embedding the file alone gives the same vector.
    model = clipworks.load(vit_bundle)
    for path, vector in zip(paths, vectors, strict=True):
        np.testing.assert_allclose(model.encode_images(path)[0], vector, atol=1e-5)


def test_classify_quotes_names_that_need_it(capsys, vit_bundle, odd_folder) -> None:
    code, out, err = run(capsys, "classify", odd_folder, "--labels", "a dog", "a cat", "-m", vit_bundle, "--top-k", "1")
    assert code == 0, err
    shown = [line for line in out.splitlines() if line.startswith(("/", "$'"))]
    assert len(shown) == len(ODD_NAMES) + 1, out
    assert any(line.startswith("$'") and line.endswith("two\\nlines.jpg'") for line in shown), out
    assert any("\\xff\\xfe latin-1 \\xe9.jpg'" in line for line in shown), out
    assert any(line.endswith("/it's.jpg") for line in shown), out  # printable: left as it is


def test_embed_texts_with_image_path_keeps_the_prompt_file(capsys, vit_bundle, photos, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "text_embeddings.json"
    earlier.write_text('{"kept": true}')
    code, out, err = run(capsys, "embed", "texts", "a dog", "--image-path", photos[0], "-m", vit_bundle)
    assert code == 0, err
    assert earlier.read_text() == '{"kept": true}'
    assert "not saved" in err and "best:" in out
    code, _, err = run(capsys, "embed", "texts", "a dog", "-m", vit_bundle)
    assert code == 0 and "replaced the previous file" in err
    assert json.loads(earlier.read_text())["entries"][0]["text"] == "a dog"


def test_classify_labels_with_their_own_article(capsys, vit_bundle, photos) -> None:
    import clipworks

    model = clipworks.load(vit_bundle)
    code, out, err = run(capsys, "classify", photos[0], "--labels", "a dog", "cat", "-m", vit_bundle, "--json")
    assert code == 0, err
    got = {r["label"]: r["logit"] for r in json.loads(out)[0]["results"]}
    image = model.encode_images(photos[0])[0]
    want = model.encode_texts(["a photo of a dog.", "a photo of a cat."]) @ image * model.logit_scale
    assert got["a dog"] == pytest.approx(float(want[0]), abs=1e-3)
    assert got["cat"] == pytest.approx(float(want[1]), abs=1e-3)
