"""Labelled images for evaluation: CIFAR's python pickles, an ImageFolder tree, or a CSV/JSON of ``path,label``.

A :class:`LabelledImages` is the images (file paths, or decoded arrays for CIFAR), one class index per image
and the dataset's own class names in the order the indices refer to:

- CIFAR-10 (``cifar-10-batches-py/test_batch``, names from ``batches.meta``'s ``label_names``) and CIFAR-100
  (``cifar-100-python/test``, ``fine_labels``, names from ``meta``'s ``fine_label_names``), read as the
  official page's ``pickle.load(f, encoding="bytes")`` reads them, but through an unpickler that builds only
  the dicts, lists, bytes and numpy arrays those files hold: a pickle can run any code, a dataset may not.
- ImageFolder: ``root/<class>/.../<image>``; classes are the sorted sub-folder names, as torchvision's
  ``ImageFolder`` numbers them, so class lists published in that order (ImageNet's) line up.
- CSV (``path,label`` rows, a header optional) or JSON (``[{"path": ..., "label": ...}, ...]``); relative
  paths are relative to the file; classes are the sorted labels (numerically when every label is a number).

Class names meet prompt names in :func:`match_classes`; shipped class lists and templates (CIFAR from
OpenAI's CLIP ``data/prompts.md``, ImageNet from open_clip's ``zero_shot_metadata``) in :func:`shipped_set`.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from clipworks.display import quote_path
from clipworks.errors import UsageError
from clipworks.labelbank import DEFAULT_TEMPLATE, check_labels
from clipworks.textfile import read_user_text

__all__ = [
    "SHIPPED_SETS",
    "ClassMatch",
    "LabelledImages",
    "has_train_split",
    "load_dataset",
    "load_lines",
    "match_classes",
    "shipped_set",
]

SHIPPED_SETS = ("cifar10", "cifar100", "imagenet1k")

# (file in the folder, key of its labels, meta file, key of its names) per CIFAR layout and split.
_CIFAR_LAYOUTS = {
    "cifar-10": {"labels": "labels", "meta": "batches.meta", "names": "label_names",
                 "test": ("test_batch",), "train": tuple(f"data_batch_{i}" for i in range(1, 6))},
    "cifar-100": {"labels": "fine_labels", "meta": "meta", "names": "fine_label_names",
                  "test": ("test",), "train": ("train",)},
}  # fmt: skip
_CIFAR_SIDE = 32
_CIFAR_ROW = 3 * _CIFAR_SIDE * _CIFAR_SIDE


@dataclass
class LabelledImages:
    """Images with one class index each; ``class_names[i]`` is the dataset's own name of class ``i``."""

    images: Sequence[Any]
    labels: np.ndarray
    class_names: list[str]
    source: str
    layout: str  # "cifar-10", "cifar-100", "imagefolder", "csv" or "json"
    names: list[str] = field(default_factory=list)  # one per image: its path, or "<file>[row]" for CIFAR

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> LabelledImages:
        keep = np.asarray(keep, dtype=np.intp)
        return LabelledImages(
            [self.images[i] for i in keep], self.labels[keep], self.class_names, self.source, self.layout,
            [self.names[i] for i in keep],
        )  # fmt: skip


# -- shipped class lists and templates --------------------------------------------------------------------


@cache
def _sets() -> dict[str, dict[str, Any]]:
    text = resources.files("clipworks").joinpath("data/zeroshot_sets.json").read_text(encoding="utf-8")
    return json.loads(text)


def shipped_set(name: str) -> tuple[list[str], list[str]]:
    """The class names and prompt templates of a shipped set: cifar10, cifar100 or imagenet1k."""
    if name not in SHIPPED_SETS:
        raise UsageError(f"{name!r} is not a shipped class set; choose one of {', '.join(SHIPPED_SETS)} or a file")
    entry = _sets()[name]
    return list(entry["classes"]), list(entry["templates"])


def load_lines(value: str, pick: Callable[[str], list[str]]) -> list[str]:
    """``pick(value)`` when ``value`` names a shipped set and no such file exists, else the file's lines (one
    entry a line, as label files are read)."""
    from clipworks.zeroshot import load_labels_file

    if value in SHIPPED_SETS and not Path(value).expanduser().exists():
        return pick(value)
    return load_labels_file(Path(value).expanduser())


# -- matching the dataset's classes to prompt names ---------------------------------------------------------


@dataclass(frozen=True)
class ClassMatch:
    """The names the prompts use, each dataset class's index among them, and the default templates."""

    prompt_names: list[str]
    column: np.ndarray  # dataset class i is prompt class column[i]
    templates: list[str]
    how: str  # "by name", "in order" or "as named"


def _spoken(name: str) -> str:
    return name.replace("_", " ").strip()


def _default_templates(prompt_names: list[str]) -> list[str]:
    for name in SHIPPED_SETS:
        classes, templates = shipped_set(name)
        if prompt_names == classes:
            return templates
    return [DEFAULT_TEMPLATE]


def match_classes(dataset: LabelledImages, given: list[str] | None, given_source: str = "--classes") -> ClassMatch:
    """Line up the dataset's classes with the prompt class names ``given`` (all of them compete).

    Without ``given``, the dataset's names are the prompts (underscores read as spaces: CIFAR-100's
    ``aquarium_fish`` is "aquarium fish"). With it, every dataset class must be one of its names (as written
    or with underscores as spaces); when none of them is but the counts agree, line ``i`` names class ``i``,
    as class lists published in the dataset's order (ImageNet's, for folders named by WordNet id) are used.
    A dataset whose names equal a shipped set's classes gets that set's templates by default.
    """
    if given is None:
        names = check_labels([_spoken(n) for n in dataset.class_names], f"the classes of {dataset.source}")
        return ClassMatch(names, np.arange(len(names)), _default_templates(names), "as named")
    given = check_labels(given, given_source)
    index = {name: i for i, name in enumerate(given)}
    found = [index.get(n, index.get(_spoken(n))) for n in dataset.class_names]
    missing = [n for n, i in zip(dataset.class_names, found, strict=True) if i is None]
    if not missing:
        return ClassMatch(given, np.array(found, dtype=np.intp), _default_templates(given), "by name")
    if len(missing) == len(dataset.class_names) and len(given) == len(dataset.class_names):
        return ClassMatch(given, np.arange(len(given)), _default_templates(given), "in order")
    shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise UsageError(
        f"{len(missing)} classes of {dataset.source} are not in {given_source} ({shown}); add them, or list "
        f"exactly {len(dataset.class_names)} names, one a line, in the dataset's class order"
    )


# -- loading --------------------------------------------------------------------------------------------------


def has_train_split(path: str | Path) -> bool:
    """True for a CIFAR folder, which holds its own train and test files."""
    p = Path(path).expanduser()
    return p.is_dir() and _cifar_layout_of_folder(p) is not None


def load_dataset(path: str | Path, split: str = "test") -> LabelledImages:
    """The dataset at ``path`` (layouts in the module docstring); ``split`` picks CIFAR's test or train files
    when ``path`` is a CIFAR folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(
            f"dataset {quote_path(p)} does not exist; pass a CIFAR folder or file, an image folder, or a CSV/JSON"
        )
    if p.is_dir():
        layout = _cifar_layout_of_folder(p)
        if layout is not None:
            files = [p / name for name in _CIFAR_LAYOUTS[layout][split]]
            return _load_cifar(files, layout)
        return _load_image_folder(p)
    layout = _cifar_layout_of_file(p)
    if layout is not None:
        return _load_cifar([p], layout)
    if p.suffix.lower() == ".csv":
        return _load_listing(p, "csv")
    if p.suffix.lower() == ".json":
        return _load_listing(p, "json")
    raise UsageError(
        f"{quote_path(p)} is not a dataset clipworks reads: pass a CIFAR file (test_batch, cifar-100-python/test) "
        "or folder, an image folder of class sub-folders, or a .csv/.json of path,label"
    )


def _cifar_layout_of_folder(folder: Path) -> str | None:
    for layout, spec in _CIFAR_LAYOUTS.items():
        if (folder / spec["meta"]).is_file() and any((folder / f).is_file() for f in (*spec["test"], *spec["train"])):
            return layout
    return None


def _cifar_layout_of_file(file: Path) -> str | None:
    for layout, spec in _CIFAR_LAYOUTS.items():
        if file.name in (*spec["test"], *spec["train"]) and (file.parent / spec["meta"]).is_file():
            return layout
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Builds plain containers, bytes and numpy arrays only (what CIFAR's pickles hold), nothing callable."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in pickle protocols 0-2
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a CIFAR pickle")
        return super().find_class(module, name)


def _read_pickle(file: Path) -> dict[str, Any]:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UsageError(f"{quote_path(file)}: cannot read it ({e.strerror or e})") from e
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # unpickling a damaged file fails with many types (EOFError, UnpicklingError, ...)
        raise UsageError(
            f"{quote_path(file)}: not a CIFAR python pickle ({type(e).__name__}: {e}); use the files from "
            "cifar-10-python.tar.gz / cifar-100-python.tar.gz"
        ) from e
    if not isinstance(obj, dict):
        raise UsageError(f"{quote_path(file)}: holds a {type(obj).__name__}, not CIFAR's dict of data and labels")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _load_cifar(files: list[Path], layout: str) -> LabelledImages:
    spec = _CIFAR_LAYOUTS[layout]
    present = [f for f in files if f.is_file()]
    if not present:
        raise UsageError(f"{quote_path(files[0].parent)} has none of {', '.join(f.name for f in files)}")
    meta_file = present[0].parent / spec["meta"]
    meta = _read_pickle(meta_file)
    raw_names = meta.get(spec["names"])
    if not isinstance(raw_names, list) or not raw_names:
        raise UsageError(f"{quote_path(meta_file)}: no {spec['names']} list; is it the {layout} meta file?")
    names = [_text(n) for n in raw_names]
    arrays, labels, row_names = [], [], []
    for file in present:
        batch = _read_pickle(file)
        data, labs = batch.get("data"), batch.get(spec["labels"])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UsageError(f"{quote_path(file)}: 'data' must be an N x {_CIFAR_ROW} uint8 array, not {got}")
        if not isinstance(labs, list | np.ndarray) or len(labs) != len(data):
            count = len(labs) if isinstance(labs, list | np.ndarray) else "no"
            raise UsageError(
                f"{quote_path(file)}: {count} {spec['labels']} for {len(data)} images; the file is damaged"
            )
        labs = np.asarray(labs)
        if labs.size and (labs.dtype.kind not in "iu" or labs.min() < 0 or labs.max() >= len(names)):
            raise UsageError(
                f"{quote_path(file)}: labels must be 0..{len(names) - 1} ({len(names)} names in {meta_file.name})"
            )
        # Rows are 1024 red, then green, then blue values of a 32x32 image, row-major: to HxWxRGB.
        arrays.append(data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1))
        labels.append(labs.astype(np.intp))
        row_names += [f"{file}[{i}]" for i in range(len(data))]
    images = np.concatenate(arrays)
    source = str(present[0] if len(present) == 1 else present[0].parent)
    return LabelledImages(list(images), np.concatenate(labels), names, source, layout, row_names)


def _load_image_folder(root: Path) -> LabelledImages:
    from clipworks.imaging import is_image_path

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UsageError(f"{quote_path(root)} has no class sub-folders; lay it out as {root.name}/<class>/<image>.jpg")
    images: list[str] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        folder = root / name
        files = sorted(
            p for p in folder.rglob("*")
            if p.is_file() and is_image_path(p) and not any(s.startswith(".") for s in p.relative_to(folder).parts)
        )  # fmt: skip
        if not files:
            raise UsageError(f"class folder {quote_path(folder)} has no images; remove it or add its images")
        images += [str(f) for f in files]
        labels += [i] * len(files)
    return LabelledImages(images, np.asarray(labels, np.intp), classes, str(root), "imagefolder", list(images))


def _listing_rows(file: Path, kind: str) -> list[tuple[str, str]]:
    text = read_user_text(file, f"a {kind.upper()} listing")
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{quote_path(file)}: not valid JSON ({e})") from e
        ok = isinstance(data, list) and all(
            isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("label"), str | int)
            for r in data
        )
        if not ok:
            raise UsageError(f'{quote_path(file)}: expected a list of {{"path": "...", "label": "..."}} objects')
        return [(r["path"], str(r["label"])) for r in data]
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = next((n for n, r in enumerate(rows, 1) if len(r) != 2 or not r[0].strip() or not r[1].strip()), None)
    if bad is not None:
        raise UsageError(f"{quote_path(file)}: data row {bad} is not 'path,label'; one image and its label a row")
    return [(r[0].strip(), r[1].strip()) for r in rows]


def _load_listing(file: Path, kind: str) -> LabelledImages:
    rows = _listing_rows(file, kind)
    if not rows:
        raise UsageError(f"{quote_path(file)} lists no images; write one 'path,label' a row")
    labels = {label for _, label in rows}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    classes = sorted(labels, key=int) if numeric else sorted(labels)
    column = {name: i for i, name in enumerate(classes)}
    paths = [str(p if (p := Path(path).expanduser()).is_absolute() else file.parent / p) for path, _ in rows]
    return LabelledImages(
        paths, np.asarray([column[label] for _, label in rows], np.intp), classes, str(file), kind, list(paths)
    )
