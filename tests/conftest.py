"""Shared test helpers: the data fixtures, real photos, and tiny random-weight bundles exported once per session."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
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


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run.

    Under pytest-xdist each worker has its own session, so each would export every tiny model again: the first
    worker to ask builds the folder (under a lock in the run's shared temp folder) and the others wait and reuse it.
    Without xdist this is a folder of the session's own temp folder, built at the first request.
    """
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder (pytest-N), above the workers' own (pytest-N/popen-gwK)
    root = base / "built-once"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not done.exists():
            if folder.exists():  # a worker whose build failed left this behind
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _export(tmp_path_factory: pytest.TempPathFactory, config: str, precisions: tuple[str, ...], **kw) -> Path:
    from clipworks.export import export_model

    key = "-".join([config, *precisions, *(f"{k}{v}" for k, v in sorted(kw.items()))])
    folder = built_once(
        tmp_path_factory, key,
        lambda d: export_model(str(MODEL_CONFIGS / f"{config}.json"), d / config, pretrained="random",
                               precisions=precisions, log=lambda _: None, **kw),
    )  # fmt: skip
    return folder / config


@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (2 layers, 128 wide) with all three precisions."""
    return _export(tmp_path_factory, "tiny-vit", ("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def int8_static_vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT with fp32 and static int8 (calibrated on the check photos): what ``--precision auto``
    takes on a CPU with VNNI or AMX."""
    return _export(tmp_path_factory, "tiny-vit", ("fp32", "int8-static"))


# The fixed batch of ``static_vit_bundle``: 5 photos through it are one full chunk and one padded one.
STATIC_BATCH = 4


@pytest.fixture(scope="session")
def static_vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT exported with a fixed batch of 4 (fp32): ``bench`` and the runtime's padded chunks use it."""
    return _export(tmp_path_factory, "tiny-vit", ("fp32",), batch=STATIC_BATCH)


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

    def build(root: Path) -> None:
        config = json.loads((MODEL_CONFIGS / "tiny-siglip2.json").read_text())
        config["text_cfg"]["hf_tokenizer_name"] = str(gemma_bpe(root / "tokenizer"))
        (root / "tiny-siglip2.json").write_text(json.dumps(config))

    return built_once(tmp_path_factory, "siglip2-config", build) / "tiny-siglip2.json"


@pytest.fixture(scope="session")
def siglip2_bundle(tmp_path_factory: pytest.TempPathFactory, siglip2_config: Path) -> Path:
    """The tiny SigLIP 2 exported in fp32 (family "siglip", a logit_bias, Gemma tokenizer files)."""
    return _export_config(tmp_path_factory, siglip2_config)


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


@pytest.fixture(scope="session")
def xlm_roberta_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/model_configs/tiny-xlm-roberta.json (open_clip's xlm-roberta-base-ViT-B-32 shape: Hugging Face
    XLM-RoBERTa text tower, mean pooling, MLP projection, CLIP's softmax) with a 2-layer XLM-R and its tokenizer."""
    from tiny_towers import build_xlm_roberta, point_at

    def build(root: Path) -> None:
        point_at(
            MODEL_CONFIGS / "tiny-xlm-roberta.json", build_xlm_roberta(root / "hf"), root / "tiny-xlm-roberta.json"
        )

    return built_once(tmp_path_factory, "xlm-roberta-config", build) / "tiny-xlm-roberta.json"


@pytest.fixture(scope="session")
def nllb_siglip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/model_configs/tiny-nllb-siglip.json (open_clip's nllb-clip-base-siglip shape: NLLB's encoder as text
    tower, first-token pooling, linear projection, SigLIP's sigmoid with a bias) with a 2-layer NLLB and tokenizer."""
    from tiny_towers import build_nllb, point_at

    def build(root: Path) -> None:
        point_at(MODEL_CONFIGS / "tiny-nllb-siglip.json", build_nllb(root / "hf"), root / "tiny-nllb-siglip.json")

    return built_once(tmp_path_factory, "nllb-siglip-config", build) / "tiny-nllb-siglip.json"


@pytest.fixture(scope="session")
def mobileclip_config() -> Path:
    """tests/model_configs/tiny-mobileclip.json (MobileCLIP-S1/S2's shape: a timm FastViT-MCi image tower, CLIP
    text without a causal mask), its image tower the tiny FastViT-MCi that ``tiny_towers`` registers with timm."""
    from tiny_towers import register_tiny_fastvit

    register_tiny_fastvit()
    return MODEL_CONFIGS / "tiny-mobileclip.json"


def _export_config(tmp_path_factory: pytest.TempPathFactory, config: Path) -> Path:
    """``config`` (a path, as the fixtures above write them) exported in fp32."""
    from clipworks.export import export_model

    def build(folder: Path) -> None:
        export_model(str(config), folder / config.stem, pretrained="random", log=lambda _: None)

    return built_once(tmp_path_factory, f"{config.stem}-fp32", build) / config.stem


@pytest.fixture(scope="session")
def xlm_roberta_bundle(tmp_path_factory: pytest.TempPathFactory, xlm_roberta_config: Path) -> Path:
    """The tiny XLM-RoBERTa CLIP exported (fp32): family "multilingual", XLM-R tokenizer files."""
    return _export_config(tmp_path_factory, xlm_roberta_config)


@pytest.fixture(scope="session")
def nllb_siglip_bundle(tmp_path_factory: pytest.TempPathFactory, nllb_siglip_config: Path) -> Path:
    """The tiny NLLB-SigLIP exported (fp32): family "multilingual-siglip", a logit_bias, NLLB tokenizer files."""
    return _export_config(tmp_path_factory, nllb_siglip_config)


@pytest.fixture(scope="session")
def mobileclip_bundle(tmp_path_factory: pytest.TempPathFactory, mobileclip_config: Path) -> Path:
    """The tiny MobileCLIP exported (fp32), its image tower re-parameterised."""
    return _export_config(tmp_path_factory, mobileclip_config)
