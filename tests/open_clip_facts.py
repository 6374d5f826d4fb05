"""What the registry ships of open_clip's model configs and weight sources, derived from the installed open_clip.

The runtime reads ``src/clipworks/data/open_clip_models.json`` (it never imports open_clip); tests/test_models.py
checks it equals :func:`facts` for the registry's records. After adding a record or upgrading open_clip, write
it again with ``PYTHONPATH=src python tests/open_clip_facts.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).resolve().parents[1] / "src" / "clipworks" / "data" / "open_clip_models.json"

# The parts of an open_clip model config the runtime reads: dimensions, and what families recognise.
CONFIG_KEYS = ("embed_dim", "init_logit_bias", "custom_text")
VISION_KEYS = ("image_size", "timm_model_name")
TEXT_KEYS = ("context_length", "vocab_size", "hf_tokenizer_name", "hf_model_name", "tokenizer_kwargs")


def config_facts(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: config[k] for k in CONFIG_KEYS if k in config}
    for section, keys in (("vision_cfg", VISION_KEYS), ("text_cfg", TEXT_KEYS)):
        part = config.get(section, {})
        out[section] = {k: part[k] for k in keys if k in part}
    return out


def facts(records: list[Any]) -> dict[str, Any]:
    """The data file's content for ``records`` (``ModelRecord``), from the installed open_clip."""
    import open_clip

    architectures = {r.arch: config_facts(open_clip.get_model_config(r.arch)) for r in records}
    weights = {}
    for r in records:
        cfg = open_clip.get_pretrained_cfg(r.arch, r.tag)
        hub = cfg.get("hf_hub", "").rstrip("/")
        weights[r.name] = {"source": f"hf-hub:{hub}" if hub else cfg.get("url", "")}
    return {
        "about": "Derived from open_clip's model configs and pretrained list by tests/open_clip_facts.py; do not edit.",
        "open_clip": open_clip.__version__,
        "architectures": dict(sorted(architectures.items())),
        "weights": weights,
    }


def main() -> None:
    from clipworks.models.registry import list_models

    DATA_FILE.write_text(json.dumps(facts(list_models()), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {DATA_FILE}")


if __name__ == "__main__":
    main()
