"""Registry names, downloads from a local hub server, the Hugging Face cache, and Immich-style bundles."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import clipworks
from clipworks.errors import DownloadError, ModelNotFound
from clipworks.models.registry import list_models, parse_model_name
from clipworks.models.store import ensure_bundle, pull

REPO = "immich-app/ViT-B-32__openai"


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("ViT-B/32", "ViT-B-32::openai"),
        ("vit-b/32", "ViT-B-32::openai"),
        ("ViT-B-32::openai", "ViT-B-32::openai"),
        ("RN50x4", "RN50x4::openai"),
        ("ViT-L/14@336px", "ViT-L-14-336::openai"),
        ("ViT-B-32::laion2b_s34b_b79k", "ViT-B-32::laion2b_s34b_b79k"),
        ("ViT-B-32::random", "ViT-B-32::random"),
        ("RN101", "RN101::openai"),
    ],
)
def test_names_and_aliases_resolve_in_one_place(name: str, canonical: str) -> None:
    assert parse_model_name(name).name == canonical


@pytest.mark.parametrize(("name", "hint"), [("ViT-B/33", "ViT-B/32"), ("RN5O", "RN50"), ("banana", "models list")])
def test_unknown_names_are_refused_with_close_matches(name: str, hint: str) -> None:
    with pytest.raises(ModelNotFound, match=hint):
        parse_model_name(name)


def test_every_record_has_a_unique_name() -> None:
    names = [m.name for m in list_models()]
    assert len(names) == len(set(names))
    assert all(m.hf_repo and m.hf_repo.startswith("immich-app/") for m in list_models())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CLIPWORKS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


def _immich_style(vit_bundle: Path, dest: Path) -> Path:
    """An Immich-layout bundle: our graphs, but no clipworks.json and extra runtime folders to ignore."""
    shutil.copytree(vit_bundle, dest, ignore=shutil.ignore_patterns("clipworks.json", "int8", "fp16"))
    (dest / "visual" / "rknpu").mkdir()
    (dest / "visual" / "rknpu" / "model.rknn").write_bytes(b"not for us")
    return dest


@pytest.fixture
def hub(vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A local HTTP server that answers like the Hugging Face hub for one repository."""
    files_root = _immich_style(vit_bundle, tmp_path / "served")
    files = sorted(str(p.relative_to(files_root)) for p in files_root.rglob("*") if p.is_file())
    state = {"requests": [], "fail": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state["requests"].append(self.path)
            if self.path == f"/api/models/{REPO}/revision/main":
                body = json.dumps({"id": REPO, "siblings": [{"rfilename": f} for f in files]}).encode()
                return self._send(200, body)
            prefix = f"/{REPO}/resolve/main/"
            if self.path.startswith(prefix):
                rel = self.path[len(prefix) :]
                if state["fail"] and rel == state["fail"]:
                    return self._send(500, b"boom")
                target = files_root / rel
                if target.is_file():
                    return self._send(200, target.read_bytes())
            self._send(404, b"not found")

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_pull_downloads_the_immich_bundle_from_the_hub(hub: dict, home: Path, vit_bundle: Path) -> None:
    path = pull("ViT-B/32", source="hub", log=lambda _: None)
    assert path == home / "models" / "ViT-B-32__openai"
    assert (path / "visual" / "model.onnx").read_bytes() == (vit_bundle / "visual" / "model.onnx").read_bytes()
    assert not (path / "visual" / "rknpu").exists()  # other runtimes' files are not fetched
    fetched = [r for r in hub["requests"] if "/resolve/" in r]
    assert len(fetched) == 7
    # Loaded by name from the cache from now on, without the network.
    model = clipworks.load("ViT-B-32::openai", download=False)
    assert model.encode_texts(["a dog"]).shape == (1, 32)


def test_a_failed_download_leaves_no_half_bundle(hub: dict, home: Path) -> None:
    hub["fail"] = "textual/model.onnx"
    with pytest.raises(DownloadError, match="HTTP 500"):
        pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert not (home / "models" / "ViT-B-32__openai").exists()
    assert [p for p in (home / "models").iterdir()] == []


def test_unreachable_hub_gives_one_clear_message(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:9"):
        pull("ViT-B-32::openai", source="hub", log=lambda _: None)


def test_offline_missing_model_says_what_to_pull(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match=r"clipworks models pull ViT-B-16::openai.*--model PATH"):
        ensure_bundle("ViT-B/16")


def test_missing_path_is_not_mistaken_for_a_name(home: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model path .*nowhere does not exist"):
        ensure_bundle("./nowhere")


def test_prefilled_hugging_face_cache_is_used_without_network(
    home: Path, tmp_path: Path, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    repo_dir = tmp_path / "hf" / ("models--" + REPO.replace("/", "--"))
    _immich_style(vit_bundle, repo_dir / "snapshots" / "0123abcd")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    bundle = ensure_bundle("ViT-B/32")
    assert bundle.root == repo_dir / "snapshots" / "0123abcd"


def test_immich_static_normalised_bundle_matches_ours(vit_bundle: Path, tmp_path: Path, source_model) -> None:
    """A bundle made the way Immich's exporter makes it (batch 1, 77 tokens, normalised in the graph)."""
    import open_clip
    import torch

    src = source_model("tiny-vit")
    dest = _immich_style(vit_bundle, tmp_path / "immich")
    net = src.model

    class Visual(torch.nn.Module):
        def forward(self, image):
            return net.encode_image(image, normalize=True)

    class Textual(torch.nn.Module):
        def forward(self, text):
            return net.encode_text(text.long(), normalize=True)

    torch.onnx.export(
        Visual(),
        (torch.randn(1, 3, 64, 64),),
        str(dest / "visual" / "model.onnx"),
        input_names=["image"],
        output_names=["embedding"],
        opset_version=17,
        dynamo=False,
    )
    torch.onnx.export(Textual(), (open_clip.tokenize(["a"]).int(),), str(dest / "textual" / "model.onnx"),
                      input_names=["text"], output_names=["embedding"], opset_version=17, dynamo=False)  # fmt: skip
    immich = clipworks.load(dest)
    ours = clipworks.load(vit_bundle)
    assert immich.bundle.meta.normalized and immich.visual.static_batch == 1
    texts = ["a dog", "a much longer prompt about a cat on a sofa", ""]
    np.testing.assert_allclose(immich.encode_texts(texts), ours.encode_texts(texts), atol=1e-5)
    images = [np.full((70, 90, 3), v, np.uint8) for v in (10, 128, 250)]
    np.testing.assert_allclose(immich.encode_images(images), ours.encode_images(images), atol=1e-5)
