"""The on-disk model bundle: Immich's CLIP layout plus a ``clipworks.json`` of our own.

Layout (Immich's, so its Hugging Face bundles load as they are)::

    config.json                 open_clip model config
    visual/model.onnx           image float32 [B,3,S,S] -> embedding [B,D]
    visual/preprocess_cfg.json  size, mean, std, interpolation, resize_mode
    textual/model.onnx          token ids [B,L] -> embedding [B,D]
    textual/tokenizer.json      (+ tokenizer_config.json, special_tokens_map.json)
    clipworks.json              ours: name, tag, logit_scale, normalisation, precisions, checks

Other precisions sit beside fp32 as ``visual/int8/model.onnx``, ``textual/fp16/model.onnx``, ...
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clipworks.atomic import atomic_write_text
from clipworks.errors import BadBundle

Tower = Literal["visual", "textual"]
# int8: dynamic (activation ranges found per batch); int8-static: QDQ with ranges fixed on calibration photos.
PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
# What a bundle exported on first use holds: fp32, dynamic int8 for who asks for it, and static int8, the
# graph `--precision auto` runs on a CPU with VNNI or AMX (runtime.encoder.resolve_precision says why).
DEFAULT_PRECISIONS = ("fp32", "int8", "int8-static")
META_FILE = "clipworks.json"
BUNDLE_FORMAT = 1


@dataclass
class BundleMeta:
    """What ``clipworks.json`` records. Immich bundles have none; the defaults describe them."""

    model: str = "unknown"
    pretrained: str = "unknown"
    logit_scale: float = 100.0
    # SigLIP's learned sigmoid bias; None for softmax families (CLIP).
    logit_bias: float | None = None
    # The runtime family (``clipworks.models.family``); None: recognised from config.json (Immich's bundles).
    family: str | None = None
    # Immich graphs L2-normalise inside the graph; ours return raw encode_image/encode_text output.
    normalized: bool = True
    opset: int | None = None
    batch: str = "1"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    source_sha256: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    format: int = BUNDLE_FORMAT

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMeta:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def graph_relpath(tower: Tower, precision: str) -> str:
    return f"{tower}/model.onnx" if precision == "fp32" else f"{tower}/{precision}/model.onnx"


@dataclass
class Bundle:
    root: Path
    config: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    meta: BundleMeta

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.config.get("text_cfg", {}).get("context_length", 77))

    @property
    def name(self) -> str:
        if self.meta.model != "unknown":
            return f"{self.meta.model}::{self.meta.pretrained}"
        return self.root.name

    def available_precisions(self, tower: Tower) -> list[str]:
        return [p for p in PRECISIONS if (self.root / graph_relpath(tower, p)).is_file()]

    def graph(self, tower: Tower, precision: str) -> Path:
        path = self.root / graph_relpath(tower, precision)
        if not path.is_file():
            have = ", ".join(self.available_precisions(tower)) or "none"
            raise BadBundle(
                f"{path} is missing: this bundle has {tower} precisions [{have}]; "
                f"pass --precision with one of them or re-export with --precision {precision}"
            )
        return path

    @property
    def textual_dir(self) -> Path:
        return self.root / "textual"

    def has_text_tower(self) -> bool:
        return (self.root / "textual" / "model.onnx").is_file() or bool(self.available_precisions("textual"))

    def write_meta(self) -> None:
        write_json(self.root / META_FILE, self.meta.to_dict())


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BadBundle(f"{path} is missing: the model folder is incomplete ({what}); re-pull or re-export it") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadBundle(f"{path} is not valid JSON ({e}); the model folder may be half-written: re-export it") from e
    if not isinstance(data, dict):
        raise BadBundle(f"{path} should hold a JSON object ({what})")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def is_bundle_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / META_FILE).is_file() or (path / "visual").is_dir()


def load_bundle(root: str | Path) -> Bundle:
    """Read and check a bundle folder; raise ``BadBundle`` naming the first missing or broken file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadBundle(f"{root} is not a folder; pass a model bundle folder or a model name")
    config = read_json(root / "config.json", "open_clip model config")
    if "embed_dim" not in config:
        raise BadBundle(f"{root / 'config.json'} has no 'embed_dim'; is this an open_clip model config?")
    preprocess_cfg = read_json(root / "visual" / "preprocess_cfg.json", "image preprocessing")
    for key in ("size", "mean", "std"):
        if key not in preprocess_cfg:
            raise BadBundle(f"{root / 'visual' / 'preprocess_cfg.json'} has no {key!r}")
    meta_path = root / META_FILE
    meta = BundleMeta.from_dict(read_json(meta_path, "clipworks metadata")) if meta_path.is_file() else BundleMeta()
    if meta.format > BUNDLE_FORMAT:
        raise BadBundle(f"{meta_path} is format {meta.format}, newer than this clipworks reads: upgrade clipworks")
    bundle = Bundle(root=root, config=config, preprocess_cfg=preprocess_cfg, meta=meta)
    if not bundle.available_precisions("visual"):
        raise BadBundle(f"{root / 'visual' / 'model.onnx'} is missing: the model folder is incomplete; re-export it")
    return bundle
