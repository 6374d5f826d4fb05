"""Shared test helpers: the data fixtures, real photos, and tiny random-weight bundles exported once per session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Real files from other tools (Hailo prompt files, label lists, sample videos), kept in the repository so that
# a plain clone runs every test; tests/data/NOTICE names each file's source and licence.
TEST_DATA = Path(__file__).resolve().parent / "data"
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
PACKAGE_PHOTOS = Path(__file__).resolve().parents[1] / "src" / "clipworks" / "data" / "check_images"


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data: hailo/ (prompt files), labels/ (Kinetics-400, ImageNet-1k), videos/ (mp4 and AVI samples)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Real photos: the ones shipped for export checks, plus CLIPWORKS_TEST_IMAGES (.ci/run sets it)."""
    found = sorted(PACKAGE_PHOTOS.glob("*.jpg"))
    extra = os.environ.get("CLIPWORKS_TEST_IMAGES")
    if extra:
        found += sorted(p for p in Path(extra).iterdir() if p.suffix.lower() in {".jpg", ".png"})
    return found


def _export(tmp_path_factory: pytest.TempPathFactory, config: str, precisions: tuple[str, ...], **kw) -> Path:
    from clipworks.export import export_model

    out = tmp_path_factory.mktemp("bundles") / config
    export_model(str(MODEL_CONFIGS / f"{config}.json"), out, pretrained="random", precisions=precisions,
                 log=lambda _: None, **kw)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (2 layers, 128 wide) with all three precisions."""
    return _export(tmp_path_factory, "tiny-vit", ("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def rn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ModifiedResNet (OpenAI's RN layout with attention pooling)."""
    return _export(tmp_path_factory, "tiny-rn", ("fp32", "int8"))


@pytest.fixture(scope="session")
def siglip2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/model_configs/tiny-siglip2.json (SigLIP 2's shape: timm ViT with MAP pooling, 64-d, 160 px; a text
    tower without causal mask pooling the last of 16 positions) with its tokenizer: a tiny Gemma-style BPE."""
    import json

    from tiny_tokenizers import gemma_bpe

    root = tmp_path_factory.mktemp("siglip2")
    config = json.loads((MODEL_CONFIGS / "tiny-siglip2.json").read_text())
    config["text_cfg"]["hf_tokenizer_name"] = str(gemma_bpe(root / "tokenizer"))
    path = root / "tiny-siglip2.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def siglip2_bundle(tmp_path_factory: pytest.TempPathFactory, siglip2_config: Path) -> Path:
    """The tiny SigLIP 2 exported in fp32 (family "siglip", a logit_bias, Gemma tokenizer files)."""
    from clipworks.export import export_model

    out = tmp_path_factory.mktemp("bundles") / "tiny-siglip2"
    export_model(str(siglip2_config), out, pretrained="random", precisions=("fp32",), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def source_model():
    """The torch models the bundles were exported from (same seed, same weights)."""
    from clipworks.export.source import load_source_model

    cache: dict[str, object] = {}

    def get(config: str | Path):
        """A name in tests/model_configs, or the path of a config (``siglip2_config``)."""
        path = config if isinstance(config, Path) else MODEL_CONFIGS / f"{config}.json"
        if config not in cache:
            cache[config] = load_source_model(str(path), "random", seed=0)
        return cache[config]

    return get


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it), for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on a free loopback port; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
