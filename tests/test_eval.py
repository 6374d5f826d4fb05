"""``clipworks eval zeroshot`` and ``eval probe`` against accuracies computed here with open_clip, torch and
scikit-learn on the same images, labels and templates.

The images are crops of the real photos shipped in ``clipworks/data/check_images``, one class per photo,
shrunk to CIFAR's 32x32 and written both as CIFAR's python pickles (bytes keys, protocol 2, as the official
``cifar-*-python.tar.gz`` files) and, losslessly, as an ImageFolder of PNGs: both layouts hold the same pixels.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipworks.cli.main import main

TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of a {}."]
DISTRACTORS = ["truck", "frog", "ship", "castle"]  # extra classes in --classes, so top-5 can miss
C_GRID = np.logspace(-6, 6, 13)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- the images -----------------------------------------------------------------------------------------------


def _crops(photo: Path, count: int) -> list[np.ndarray]:
    """``count`` different 32x32 views of one photo: sliding square crops, every other one mirrored."""
    im = Image.open(photo).convert("RGB")
    side = min(im.size)
    views = []
    for i in range(count):
        s = int(side * (0.6 + 0.4 * ((i * 7) % 5) / 4))
        x = (im.width - s) * ((i * 3) % count) // max(1, count - 1)
        y = (im.height - s) * ((i * 5) % count) // max(1, count - 1)
        view = im.crop((x, y, x + s, y + s)).resize((32, 32), Image.Resampling.BICUBIC)
        if i % 2:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(np.asarray(view))
    return views


def _scenes(photos: list[Path], per_class: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names (the photos' subjects), ``(N, 32, 32, 3)`` uint8 images and their labels, class-major."""
    names = [p.stem.rstrip("0123456789_").replace("_cls", "") for p in photos]
    images = [view for p in photos for view in _crops(p, per_class)]
    labels = np.repeat(np.arange(len(photos)), per_class)
    return names, np.stack(images), labels


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(folder: Path, names: list[str], images: np.ndarray, labels: np.ndarray, file: str = "test_batch"):
    """``cifar-10-batches-py``: ``batches.meta`` and a batch with b"data" (N x 3072, R then G then B planes)."""
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": len(labels),
                                    b"num_vis": 3072})  # fmt: skip
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    filenames = [f"img_{i}.png".encode() for i in range(len(labels))]
    _dump(folder / file, {b"batch_label": b"testing batch 1 of 1", b"labels": [int(x) for x in labels],
                          b"data": data, b"filenames": filenames})  # fmt: skip
    return folder / file


def write_cifar100(folder: Path, names: list[str], images: np.ndarray, labels: np.ndarray) -> Path:
    """``cifar-100-python``: ``meta`` (fine and coarse names) and ``test`` with b"fine_labels"."""
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]})
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    _dump(folder / "test", {b"filenames": [b"x.png"] * len(labels), b"batch_label": b"testing batch 1 of 1",
                            b"fine_labels": [int(x) for x in labels], b"coarse_labels": [0] * len(labels),
                            b"data": data})  # fmt: skip
    return folder / "test"


def write_image_folder(root: Path, names: list[str], images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{i:03d}.png")
    return root


# -- the reference: open_clip + torch + scikit-learn ---------------------------------------------------------------


def torch_image_embeddings(src, images: np.ndarray) -> np.ndarray:
    import open_clip
    import torch

    cfg = src.preprocess_cfg
    transform = open_clip.image_transform(tuple(cfg["size"]), is_train=False, mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        pixels = torch.stack([transform(Image.fromarray(a)) for a in images])
        return src.model.encode_image(pixels, normalize=True).numpy()


def open_clip_topk(src, images: np.ndarray, labels: np.ndarray, classes: list[str], templates: list[str]):
    """(top-1 hits, top-5 hits, hits per true class) by open_clip's own zero-shot classifier and its accuracy rule."""
    import open_clip
    import torch

    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            src.model, open_clip.get_tokenizer(src.arch), classes, templates, device="cpu", use_tqdm=False
        )
        logits = torch.from_numpy(torch_image_embeddings(src, images)) @ weights
        pred = logits.topk(min(5, len(classes)), 1, True, True)[1].t()
        correct = pred.eq(torch.from_numpy(labels).view(1, -1).expand_as(pred))
    per_class = {classes[c]: int(correct[0][torch.from_numpy(labels == c)].sum()) for c in np.unique(labels)}
    return int(correct[:1].sum()), int(correct[:5].any(0).sum()), per_class


def sklearn_probe(train_x, train_y, test_x, test_y, seed: int = 0, validation: float = 0.2) -> tuple[float, float]:
    """(test top-1, C) of the CLIP paper's probe: C swept on a stratified validation split, refit, scored."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(train_y))
    held = max(n_classes, round(validation * len(train_y)))
    fit, val = train_test_split(np.arange(len(train_y)), test_size=held, stratify=train_y, random_state=seed)
    fit, val = np.sort(fit), np.sort(val)
    scores = []
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(train_x[fit], train_y[fit])
        scores.append((clf.predict(train_x[val]) == train_y[val]).mean())
    best = float(C_GRID[int(np.argmax(scores))])  # argmax: the smallest C among the best, as clipworks picks
    clf = LogisticRegression(C=best, max_iter=1000, random_state=seed).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean()), best


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(photos):
    return _scenes(photos[:6], per_class=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, scenes) -> dict[str, Path]:
    names, images, labels = scenes
    root = tmp_path_factory.mktemp("eval")
    (root / "classes.txt").write_text("\n".join([*DISTRACTORS[:2], *names, *DISTRACTORS[2:]]) + "\n")
    (root / "templates.txt").write_text("# CLIP-style prompts\n" + "\n".join(TEMPLATES) + "\n")
    return {
        "cifar10": write_cifar10(root / "cifar-10-batches-py", names, images, labels),
        "cifar100": write_cifar100(root / "cifar-100-python", names, images, labels),
        "folder": write_image_folder(root / "folder", names, images, labels),
        "classes": root / "classes.txt",
        "templates": root / "templates.txt",
    }


@pytest.fixture(scope="module")
def reference(scenes, files, source_model):
    names, images, labels = scenes
    classes = files["classes"].read_text().split()
    column = np.array([classes.index(n) for n in names])
    return open_clip_topk(source_model("tiny-vit"), images, column[labels], classes, TEMPLATES)


# -- zero-shot --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["cifar10", "cifar100", "folder"])
def test_zeroshot_accuracy_equals_open_clips(capsys, vit_bundle, files, scenes, reference, layout) -> None:
    names, _, labels = scenes
    top1, top5, per_class = reference
    assert 0 < top1 < len(labels) and top5 < len(labels), "the reference must be able to tell a wrong answer"
    code, out, err = run(
        capsys, "eval", "zeroshot", files[layout], "--classes", files["classes"], "--templates", files["templates"],
        "--json", "-m", vit_bundle, "--precision", "fp32",
    )  # fmt: skip
    assert code == 0, err
    got = json.loads(out)
    assert (got["n"], got["classes"], got["templates"], got["skipped"]) == (len(labels), 10, 3, 0)
    assert got["top1"] == top1 / len(labels)
    assert got["top5"] == top5 / len(labels)
    assert {c["class"]: round(c["top1"] * c["n"]) for c in got["per_class"]} == per_class
    assert {c["class"] for c in got["per_class"]} == set(names)


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_csv_and_json_listings_score_as_open_clip(capsys, vit_bundle, files, scenes, reference, tmp_path, kind):
    """The folder's images listed as path,label (CSV: relative to the file, JSON: absolute) score the same."""
    _, _, labels = scenes
    rows = [(p.relative_to(files["folder"].parent), p.parent.name) for p in sorted(files["folder"].rglob("*.png"))]
    listing = files["folder"].parent / f"listing.{kind}"
    if kind == "csv":
        listing.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    else:
        listing.write_text(json.dumps([{"path": str(listing.parent / p), "label": label} for p, label in rows]))
    code, out, err = run(
        capsys, "eval", "zeroshot", listing, "--classes", files["classes"], "--templates", files["templates"],
        "--json", "-m", vit_bundle, "--precision", "fp32",
    )  # fmt: skip
    assert code == 0, err
    got = json.loads(out)
    assert (got["n"], got["top1"], got["top5"]) == (len(labels), reference[0] / len(labels), reference[1] / len(labels))


def test_classes_file_names_wordnet_style_folders_in_order(capsys, vit_bundle, tmp_path, scenes, source_model):
    """Folders named by id (n000, n001, ...) take --classes line i as class i, as ImageNet's lists are used."""
    names, images, labels = scenes
    folder = write_image_folder(tmp_path / "val", [f"n{i:03d}" for i in range(len(names))], images, labels)
    (tmp_path / "names.txt").write_text("\n".join(names))
    code, out, err = run(
        capsys, "eval", "zeroshot", folder, "--classes", tmp_path / "names.txt", "--templates", "cifar10",
        "--json", "-m", vit_bundle, "--precision", "fp32",
    )  # fmt: skip
    assert code == 0, err
    assert "'n000' is 'baboon'" in err
    got = json.loads(out)
    from clipworks.eval.datasets import shipped_set

    top1, top5, per_class = open_clip_topk(source_model("tiny-vit"), images, labels, names, shipped_set("cifar10")[1])
    assert (got["top1"], got["top5"], got["templates"]) == (top1 / len(labels), top5 / len(labels), 18)
    assert {c["class"]: round(c["top1"] * c["n"]) for c in got["per_class"]} == per_class


def test_shipped_cifar10_names_bring_openais_templates(capsys, vit_bundle, tmp_path, scenes, source_model) -> None:
    """A CIFAR-10 file with CIFAR-10's own names is scored with the 18 CIFAR templates of CLIP's paper."""
    from clipworks.eval.datasets import shipped_set

    _, images, labels = scenes
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    file = write_cifar10(tmp_path / "cifar-10-batches-py", cifar10, images, labels)
    code, out, err = run(capsys, "eval", "zeroshot", file, "--json", "-m", vit_bundle, "--precision", "fp32")
    assert code == 0, err
    got = json.loads(out)
    _, templates = shipped_set("cifar10")
    assert len(templates) == got["templates"] == 18
    top1, top5, _ = open_clip_topk(source_model("tiny-vit"), images, labels, cifar10, templates)
    assert (got["top1"], got["top5"]) == (top1 / len(labels), top5 / len(labels))


def test_shipped_sets_equal_open_clips_metadata() -> None:
    """ImageNet's names and templates are open_clip's; CIFAR's are the datasets' own names, underscores as spaces."""
    from open_clip import zero_shot_metadata

    from clipworks.eval.datasets import shipped_set

    classes, templates = shipped_set("imagenet1k")
    assert classes == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert templates == [t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    cifar100, _ = shipped_set("cifar100")
    assert len(cifar100) == 100 and cifar100 == sorted(cifar100)
    assert {"aquarium fish", "lawn mower", "sweet pepper", "willow tree"} <= set(cifar100)
    assert shipped_set("cifar10")[1] == shipped_set("cifar100")[1]


def test_compare_prints_the_accuracy_each_precision_loses(capsys, vit_bundle, files, reference, scenes) -> None:
    args = ["eval", "zeroshot", files["folder"], "--classes", files["classes"], "--templates", files["templates"],
            "-m", vit_bundle, "--compare", "fp32,int8,fp16"]  # fmt: skip
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    got = json.loads(out)
    rows = {r["precision"]: r for r in got["compare"]}
    assert [r["precision"] for r in got["compare"]] == ["fp32", "int8", "fp16"]
    assert got["top1"] == rows["fp32"]["top1"] == reference[0] / len(scenes[2])
    for r in got["compare"]:
        assert r["lost_top1"] == pytest.approx(rows["fp32"]["top1"] - r["top1"])
        assert r["lost_top5"] == pytest.approx(rows["fp32"]["top5"] - r["top5"])
    code, out, _ = run(capsys, *args)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["precision", "top-1", "top-5", "lost", "top-1", "lost", "top-5"]
    assert [line.split()[0] for line in lines[1:]] == ["fp32", "int8", "fp16"]
    assert lines[1].split()[1:] == [f"{rows['fp32']['top1']:.4f}", f"{rows['fp32']['top5']:.4f}", "+0.0000", "+0.0000"]


def test_text_report_names_the_worst_classes_and_their_confusions(capsys, vit_bundle, files) -> None:
    base = ["eval", "zeroshot", files["folder"], "--templates", files["templates"], "-m", vit_bundle]
    code, out, _ = run(capsys, *base, "--json", "--worst", "2")
    worst = json.loads(out)["worst"]
    code, text, _ = run(capsys, *base, "--worst", "2")
    assert code == 0
    lines = text.splitlines()
    assert lines[1].startswith("top-1 ") and lines[2].startswith("top-5 ") and lines[3] == "worst 2 classes:"
    assert [line.split()[0] for line in lines[4:]] == [w["class"] for w in worst]
    for line, w in zip(lines[4:], worst, strict=True):
        for confusion in w["confused_with"]:
            assert f"{confusion['class']} {confusion['count']}" in line


def test_unreadable_images_are_skipped_named_and_counted(capsys, vit_bundle, files, tmp_path, scenes) -> None:
    import shutil

    folder = shutil.copytree(files["folder"], tmp_path / "folder")
    broken = next((folder / "baboon").iterdir())
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = run(capsys, "eval", "zeroshot", folder, "--json", "-m", vit_bundle)
    assert code == 0
    got = json.loads(out)
    assert (got["n"], got["skipped"]) == (len(scenes[2]) - 1, 1)
    assert str(broken) in err and "skipped 1 of 18" in err


# -- linear probe -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_scenes(photos):
    return _scenes(photos[:6], per_class=8)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Dozens of tiny L-BFGS fits: on a busy machine BLAS threads contending for cores cost them 5-10x."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def test_probe_on_an_image_folder_equals_sklearn_on_torch_embeddings(
    capsys, vit_bundle, tmp_path, probe_scenes, source_model
) -> None:
    """One folder, split 70/30 per class (seeded); C swept on a validation split of the 70."""
    from sklearn.model_selection import train_test_split

    names, images, labels = probe_scenes
    folder = write_image_folder(tmp_path / "folder", names, images, labels)
    code, out, err = run(capsys, "eval", "probe", folder, "--json", "-m", vit_bundle, "--precision", "fp32")
    assert code == 0, err
    got = json.loads(out)
    # ImageFolder numbers classes by sorted folder name.
    order = sorted(names)
    y = np.array([order.index(names[c]) for c in labels])
    emb = torch_image_embeddings(source_model("tiny-vit"), images)
    by_file = np.argsort([f"{names[c]}/{i:03d}" for i, c in enumerate(labels)], kind="stable")
    emb, y = emb[by_file], y[by_file]
    held = max(len(names), round(0.3 * len(y)))
    train, test = (np.sort(i) for i in train_test_split(np.arange(len(y)), test_size=held, stratify=y, random_state=0))
    top1, c = sklearn_probe(emb[train], y[train], emb[test], y[test])
    assert (got["train"], got["test"], got["n"]) == (len(train), len(test), len(test))
    assert got["C"] == pytest.approx(c)
    # Embeddings from ONNX Runtime and torch differ by ~1e-6, far below any decision margin of the probe.
    assert got["top1"] == top1
    assert 0 < top1 < 1


def test_probe_on_cifar_uses_its_own_train_and_test_files(capsys, vit_bundle, tmp_path, probe_scenes, source_model):
    names, images, labels = probe_scenes
    test = np.arange(len(labels)) % 4 == 0
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, names, images[~test], labels[~test], "data_batch_1")
    write_cifar10(folder, names, images[test], labels[test], "test_batch")
    code, out, err = run(capsys, "eval", "probe", folder, "--json", "-m", vit_bundle, "--precision", "fp32")
    assert code == 0, err
    got = json.loads(out)
    emb = torch_image_embeddings(source_model("tiny-vit"), images)
    top1, c = sklearn_probe(emb[~test], labels[~test], emb[test], labels[test])
    assert (got["train"], got["test"], got["top1"]) == (int((~test).sum()), int(test.sum()), top1)
    assert got["C"] == pytest.approx(c)
    code, text, _ = run(capsys, "eval", "probe", folder, "-m", vit_bundle, "--precision", "fp32", "--c", "1")
    assert code == 0 and "C      1\n" in text and "top-1 " in text


# -- hostile input ----------------------------------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


_NEEDS_FOLDER = {"empty-class", "classes-missing", "classes-file-missing", "empty-classes-file", "no-brace",
                 "bad-compare", "bad-split"}  # fmt: skip


def _break(kind: str, root: Path, scenes) -> list[str]:
    """Build one kind of bad input under ``root``; the extra arguments for ``eval zeroshot``."""
    names, images, labels = scenes
    cifar = root / "cifar-10-batches-py"
    if kind.startswith("cifar"):
        write_cifar10(cifar, names, images, labels)
    folder = root / "folder"
    if kind in _NEEDS_FOLDER:
        write_image_folder(folder, names, images[:6], labels[:6])
    batch = cifar / "test_batch"
    match kind:
        case "missing":
            return [str(root / "nowhere")]
        case "unknown-file":
            (root / "notes.txt").write_text("x")
            return [str(root / "notes.txt")]
        case "cifar-garbage":
            batch.write_bytes(b"not a pickle at all")
        case "cifar-exploit":
            _dump(batch, {b"data": _Exploit()})
        case "cifar-shape":
            _dump(batch, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
        case "cifar-count":
            _dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
        case "cifar-range":
            _dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]})
        case "cifar-meta":
            _dump(cifar / "batches.meta", {b"num_vis": 3072})
        case "cifar-not-dict":
            _dump(batch, [1, 2, 3])
        case "empty-class":
            (folder / "zebra").mkdir()
        case "no-classes":
            folder.mkdir()
            Image.fromarray(images[0]).save(folder / "loose.png")
            return [str(folder)]
        case "classes-missing":
            (root / "c.txt").write_text("dog\ncat\nbird\n")
            return [str(folder), "--classes", str(root / "c.txt")]
        case "classes-file-missing":
            return [str(folder), "--classes", str(root / "nowhere.txt")]
        case "empty-classes-file":
            (root / "c.txt").write_text("# nothing\n\n")
            return [str(folder), "--classes", str(root / "c.txt")]
        case "no-brace":
            (root / "t.txt").write_text("a photo\n")
            return [str(folder), "--templates", str(root / "t.txt")]
        case "bad-compare":
            return [str(folder), "--compare", "fp32,fp8"]
        case "bad-split":
            return [str(folder), "--split", "val"]
        case "csv-row":
            (root / "l.csv").write_text("path,label\na.png,cat\nb.png\n")
            return [str(root / "l.csv")]
        case "json-shape":
            (root / "l.json").write_text('{"a.png": "cat"}')
            return [str(root / "l.json")]
    return [str(cifar if kind.startswith("cifar") else folder)]


HOSTILE = [
    ("missing", "does not exist"),
    ("unknown-file", "not a dataset clipworks reads"),
    ("cifar-garbage", "not a CIFAR python pickle"),
    ("cifar-exploit", "refusing posix.system"),
    ("cifar-shape", "N x 3072 uint8 array"),
    ("cifar-count", "1 labels for 2 images"),
    ("cifar-range", "labels must be 0..5"),
    ("cifar-meta", "no label_names"),
    ("cifar-not-dict", "holds a list"),
    ("empty-class", "zebra has no images"),
    ("no-classes", "no class sub-folders"),
    ("classes-missing", "are not in --classes"),
    ("classes-file-missing", "nowhere.txt: no such file"),
    ("empty-classes-file", "no labels in the file"),
    ("no-brace", "has no '{}'"),
    ("bad-compare", "'fp32,fp8'"),
    ("bad-split", "--split"),
    ("csv-row", "row 2"),
    ("json-shape", "expected a list"),
]


@pytest.mark.parametrize(("kind", "message"), HOSTILE, ids=[k for k, _ in HOSTILE])
def test_bad_input_gets_one_line_and_an_exit_code(capsys, vit_bundle, tmp_path, scenes, kind, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "eval", "zeroshot", *_break(kind, tmp_path, scenes), "-m", vit_bundle)
    lines = err.strip().splitlines()
    assert code != 0 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test-fraction", "1.5"], "between 0 and 1"),
        (["--c", "0"], "--c must be positive"),
        (["--test", "{tmp}/other"], "not in the training classes"),
    ],
)
def test_bad_probe_input_gets_one_line(capsys, vit_bundle, tmp_path, scenes, args, message) -> None:
    names, images, labels = scenes
    folder = write_image_folder(tmp_path / "folder", names, images, labels)
    write_image_folder(tmp_path / "other", ["zebra", *names[1:]], images, labels)
    argv = ["eval", "probe", folder, "-m", vit_bundle, *(a.format(tmp=tmp_path) for a in args)]
    code, _, err = run(capsys, *argv)
    assert code != 0 and len(err.strip().splitlines()) == 1 and message in err, err


def test_probe_without_scikit_learn_names_the_extra(tmp_path) -> None:
    """A runtime-only install (scikit-learn made unimportable) gets one line naming the extra, before any work."""
    import os
    import subprocess
    import sys

    import clipworks

    script = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from clipworks.cli.main import entry\n"
        f"sys.argv = ['clipworks', 'eval', 'probe', {str(tmp_path)!r}]\n"
        "entry()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(clipworks.__file__).parents[1])},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "scikit-learn" in lines[0] and "pip install 'clipworks[eval]'" in lines[0]
