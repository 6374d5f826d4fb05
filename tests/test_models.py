"""Registry names and their hub repositories, pulls through huggingface_hub from a local hub, the Hugging Face
cache, and Immich-style bundles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import clipworks
from clipworks import settings
from clipworks.cli.main import main
from clipworks.errors import BadBundle, DownloadError, ModelNotFound
from clipworks.models.immich_names import OPENCLIP_BUNDLES
from clipworks.models.registry import list_models, parse_model_name
from clipworks.models.store import can_fetch, ensure_bundle, pull
from conftest import serve_app

REPO = "immich-app/ViT-B-32__openai"
# The sources this test process imported clipworks from: subprocesses run the same code.
SRC = Path(clipworks.__file__).resolve().parents[1]
# Every variable that moves huggingface_hub's cache, token, endpoint or offline mode: cleared for each test.
HF_VARS = (
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CLIPWORKS_OFFLINE",
)  # fmt: skip


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


# Immich's published names spell three LAION tags with hyphens, and it has no datacomp_xl bundles.
@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("ViT-B-32::openai", "immich-app/ViT-B-32__openai"),
        ("ViT-L-14-336::openai", "immich-app/ViT-L-14-336__openai"),
        ("ViT-B-32::laion2b_s34b_b79k", "immich-app/ViT-B-32__laion2b-s34b-b79k"),
        ("ViT-L-14::laion2b_s32b_b82k", "immich-app/ViT-L-14__laion2b-s32b-b82k"),
        ("ViT-H-14::laion2b_s32b_b79k", "immich-app/ViT-H-14__laion2b-s32b-b79k"),
        ("ViT-B-32::laion2b_e16", "immich-app/ViT-B-32__laion2b_e16"),
        ("ViT-g-14::laion2b_s12b_b42k", "immich-app/ViT-g-14__laion2b-s12b-b42k"),
        ("ViT-B-32::datacomp_xl_s13b_b90k", None),
        ("ViT-L-14::datacomp_xl_s13b_b90k", None),
    ],
)
def test_hub_repositories_are_the_names_immich_publishes(name: str, repo: str | None) -> None:
    assert parse_model_name(name).hf_repo == repo


def test_every_registry_repository_is_on_immichs_list() -> None:
    repos = [m.hf_repo for m in list_models() if m.hf_repo]
    assert repos, "no record has a ready bundle"
    for repo in repos:
        org, _, name = repo.partition("/")
        assert org == "immich-app" and name in OPENCLIP_BUNDLES, repo


def test_records_are_open_clip_weight_sets_and_cover_immichs_bundles() -> None:
    """Each record is one of open_clip's pretrained weight sets, with its config's dimension and image size;
    every open_clip weight set Immich publishes a bundle of has a record, whatever its text tower."""
    import open_clip

    pretrained = {(a.lower(), t.lower()): (a, t) for a, t in open_clip.list_pretrained()}
    for record in list_models():
        assert (record.arch, record.tag) in open_clip.list_pretrained(), f"{record.name} is not an open_clip weight set"
        config = open_clip.get_model_config(record.arch)
        assert (record.embed_dim, record.image_size) == (config["embed_dim"], config["vision_cfg"]["image_size"]), (
            record.name
        )
        assert record.context_length == config["text_cfg"].get("context_length", 77), record.name
    named = {(m.arch, m.tag) for m in list_models()}
    for immich_name in sorted(OPENCLIP_BUNDLES):
        arch, _, tag = immich_name.partition("__")
        weights = pretrained.get((arch.lower(), tag.replace("-", "_").lower()))
        if weights is None:
            continue  # not an open_clip weight set (fg-clip2-base)
        assert weights in named, f"Immich publishes {immich_name} but the registry has no {weights[0]}::{weights[1]}"


def test_the_shipped_open_clip_facts_are_the_installed_open_clips() -> None:
    """data/open_clip_models.json is derived from open_clip, never typed: regenerate it, do not edit it."""
    from clipworks.models.registry import OPEN_CLIP_FACTS
    from open_clip_facts import facts

    shipped = json.loads(OPEN_CLIP_FACTS.read_text())
    expected = facts(list_models())
    assert shipped["architectures"] == expected["architectures"], "run: PYTHONPATH=src python tests/open_clip_facts.py"
    assert shipped["weights"] == expected["weights"], "run: PYTHONPATH=src python tests/open_clip_facts.py"


@pytest.mark.parametrize(
    ("name", "family", "source", "licence"),
    [
        ("ViT-B-32::openai", "clip", "hf-hub:timm/vit_base_patch32_clip_224.openai", "mit"),
        ("ViT-B-16-SigLIP2::webli", "siglip", "hf-hub:timm/ViT-B-16-SigLIP2", "apache-2.0"),
        ("ViT-B-16-SigLIP::webli", "siglip", "hf-hub:timm/ViT-B-16-SigLIP", "apache-2.0"),
        ("MobileCLIP-S2::datacompdr", "clip", "hf-hub:apple/MobileCLIP-S2-OpenCLIP", "apple-amlr"),
        ("ViT-H-14-quickgelu::dfn5b", "clip", "hf-hub:apple/DFN5B-CLIP-ViT-H-14", "apple-ascl"),
        ("nllb-clip-base-siglip::v1", "siglip", "hf-hub:visheratin/nllb-clip-base-siglip", "cc-by-nc-4.0"),
    ],
)
def test_records_know_their_family_source_and_licence(name: str, family: str, source: str, licence: str) -> None:
    record = parse_model_name(name).record
    assert record is not None
    assert (record.family, record.licence) == (family, licence)
    assert record.source.startswith(source)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _immich_style(vit_bundle: Path, dest: Path) -> Path:
    """An Immich-layout bundle: our graphs, but no clipworks.json, and other runtimes' graphs to ignore."""
    shutil.copytree(vit_bundle, dest, ignore=shutil.ignore_patterns("clipworks.json", "int8", "fp16"))
    (dest / "visual" / "rknpu" / "rk3588").mkdir(parents=True)
    (dest / "visual" / "rknpu" / "rk3588" / "model.rknn").write_bytes(b"not for us")
    (dest / "textual" / "fp16").mkdir()
    (dest / "textual" / "fp16" / "model.armnn").write_bytes(b"not for us either")
    return dest


def _repo_files(vit_bundle: Path, tmp_path: Path) -> dict[str, bytes]:
    """The files of an Immich CLIP repository as the hub holds them (README and .gitattributes included)."""
    root = _immich_style(vit_bundle, tmp_path / "repo")
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    files[".gitattributes"] = (
        b"*.onnx filter=lfs diff=lfs merge=lfs -text\n*.armnn filter=lfs diff=lfs merge=lfs -text\n"
    )
    files["README.md"] = b"---\ntags:\n - immich\n - clip\n---\n# Model Description\n"
    return files


RUNTIME_FILES = {  # what a pull fetches: config.json and the files directly under visual/ and textual/
    "config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "textual/model.onnx",
    "textual/tokenizer.json", "textual/tokenizer_config.json", "textual/special_tokens_map.json",
}  # fmt: skip
LFS_SUFFIXES = (".onnx", ".armnn", ".rknn")


class FakeHub:
    """The endpoints huggingface_hub uses, answered as the Hugging Face hub answers them, for one repository:
    revision info, the recursive tree, and ``resolve`` (HEAD and GET). Large (LFS) files redirect to a
    second server reached under another host name, as the hub redirects to its CDN."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.commits: dict[str, dict[str, bytes]] = {}
        self.main = ""
        self.main_after_first_info: str | None = None  # a push that lands while a pull is running
        self.fail_blob_of: str | None = None  # a file whose CDN download fails ...
        self.failure = "HTTP 500"  # ... with this answer, or "cut" (the connection drops)
        self.hub_requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.cdn_requests: list[tuple[str, str, str | None]] = []
        self.cdn_url = ""

    def push(self, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.commits[sha] = files
        self.main = self.main or sha
        return sha

    def _commit(self, rev: str) -> str | None:
        sha = self.main if rev == "main" else rev
        return sha if sha in self.commits else None

    def hub_app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def missing_repo() -> Response:
            # What the hub answers for a repository that does not exist (or that the token may not read).
            return JSONResponse({"error": "Repository not found"}, 401, headers={"X-Error-Code": "RepoNotFound"})

        def commit_of(request) -> str | None:
            """Record the request; the commit it names, None if this hub has no such repository or revision."""
            self.hub_requests.append((request.method, request.url.path, request.headers.get("authorization")))
            repo = f"{request.path_params['org']}/{request.path_params['name']}"
            return self._commit(request.path_params["rev"]) if repo == self.repo else None

        async def revision(request):
            if (sha := commit_of(request)) is None:
                return missing_repo()
            files = self.commits[sha]
            siblings = [{"rfilename": f} for f in sorted(files)]
            body = {"_id": "65b0", "id": self.repo, "modelId": self.repo, "sha": sha, "private": False,
                    "tags": ["onnx", "immich", "clip"], "siblings": siblings}  # fmt: skip
            if request.path_params["rev"] == "main" and self.main_after_first_info:
                self.main, self.main_after_first_info = self.main_after_first_info, None
            return JSONResponse(body)

        async def tree(request):
            if (sha := commit_of(request)) is None:
                return missing_repo()
            entries, folders = [], set()
            for path, data in sorted(self.commits[sha].items()):
                parts = path.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                entry = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": path}
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "oid": "0" * 40, "path": f} for f in sorted(folders)]
            return JSONResponse(entries)

        async def resolve(request):
            if (sha := commit_of(request)) is None:
                return missing_repo()
            path = request.path_params["path"]
            data = self.commits[sha].get(path)
            if data is None:
                return Response(
                    b"Entry not found", 404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
                )
            if path.endswith(LFS_SUFFIXES):
                oid = hashlib.sha256(data).hexdigest()
                return Response(status_code=302, headers={
                    "Location": f"{self.cdn_url}/repos/{oid}?path={path}", "X-Repo-Commit": sha,
                    "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data)), "ETag": f'"{_git_blob_sha(data)}"',
                })  # fmt: skip
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(data)}"', "Content-Length": str(len(data))}
            return Response(b"" if request.method == "HEAD" else data, headers=headers)

        return Starlette(routes=[
            Route("/api/models/{org}/{name}/revision/{rev}", revision),
            Route("/api/models/{org}/{name}/tree/{rev}", tree),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", resolve, methods=["GET", "HEAD"]),
        ])  # fmt: skip

    def cdn_app(self):
        from starlette.applications import Starlette
        from starlette.responses import Response, StreamingResponse
        from starlette.routing import Route

        async def blob(request):
            self.cdn_requests.append((request.method, request.url.path, request.headers.get("authorization")))
            blobs = {hashlib.sha256(d).hexdigest(): (p, d) for files in self.commits.values() for p, d in files.items()}
            path, data = blobs.get(request.path_params["oid"], (None, b""))
            if path is None:
                return Response(b"NoSuchKey", 404)
            if path == self.fail_blob_of and self.failure == "HTTP 500":
                return Response(b"InternalError", 500)
            if path == self.fail_blob_of:  # the connection drops after the headers, before any byte of the body

                async def nothing():
                    yield b""

                return StreamingResponse(nothing(), headers={"Content-Length": str(len(data))})
            return Response(data, headers={"Content-Length": str(len(data))})

        return Starlette(routes=[Route("/repos/{oid}", blob, methods=["GET", "HEAD"])])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: the clipworks cache, the Hugging Face home and its hub cache under tmp_path."""
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "home"


@pytest.fixture
def hub(vit_bundle: Path, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub(REPO)
    fake.push(_repo_files(vit_bundle, tmp_path))
    with serve_app(fake.cdn_app()) as cdn_url, serve_app(fake.hub_app()) as hub_url:
        # The same loopback server under another host name: to huggingface_hub it is a different host.
        fake.cdn_url = cdn_url.replace("127.0.0.1", "localhost")
        monkeypatch.setenv("HF_ENDPOINT", hub_url)
        yield fake


def _snapshot(commit: str, repo: str = REPO) -> Path:
    return settings.hf_hub_cache() / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_pull_downloads_the_runtime_files_of_immichs_bundle(hub: FakeHub, home: Path, monkeypatch) -> None:
    path = pull("ViT-B/32", source="hub", log=lambda _: None)
    assert path == _snapshot(hub.main)
    assert _tree(path) == {f: hub.commits[hub.main][f] for f in RUNTIME_FILES}  # no README, rknn or armnn
    assert not [r for r in hub.hub_requests + hub.cdn_requests if "rknn" in r[1] or "armnn" in r[1]]
    # Loaded by name from the Hugging Face cache from now on, without the network.
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    model = clipworks.load("ViT-B-32::openai")
    assert model.bundle.root == path
    assert model.encode_texts(["a dog"]).shape == (1, 32)


def test_every_file_comes_from_the_commit_main_had_when_the_pull_began(hub: FakeHub, home: Path) -> None:
    first = hub.main
    moved = {name: data + b" " if name.endswith(".json") else data + b"\0" for name, data in hub.commits[first].items()}
    hub.main_after_first_info = hub.push(moved)
    path = pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert path == _snapshot(first)
    assert _tree(path) == {f: hub.commits[first][f] for f in RUNTIME_FILES}
    resolved = [p for _, p, _ in hub.hub_requests if "/resolve/" in p]
    assert resolved and all(f"/resolve/{first}/" in p for p in resolved)


@pytest.mark.parametrize("where", ["HF_TOKEN", "HF_TOKEN_PATH", "HF_HOME/token"])
def test_the_token_goes_to_the_hub_and_never_across_a_redirect_to_another_host(
    hub: FakeHub, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
    elif where == "HF_TOKEN_PATH":
        (tmp_path / "elsewhere").write_text("hf_secret\n")
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    else:
        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text("hf_secret")
    pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert hub.hub_requests and all(auth == "Bearer hf_secret" for _, _, auth in hub.hub_requests)
    fetched = {path for method, path, _ in hub.cdn_requests if method == "GET"}
    assert len(fetched) == 2  # visual/model.onnx and textual/model.onnx came from the other host
    assert all(auth is None for _, _, auth in hub.cdn_requests)


@pytest.mark.parametrize("variable", ["CLIPWORKS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_pull_sends_no_request_and_says_what_to_do(
    hub: FakeHub, home: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ModelNotFound, match=r"ViT-B-32::openai is not downloaded .*models pull ViT-B-32::openai"):
        pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert hub.hub_requests == []


def test_a_repository_the_hub_does_not_have_is_named_with_its_answer(hub: FakeHub, home: Path) -> None:
    with pytest.raises(DownloadError, match=r"/immich-app/ViT-L-14__openai answered HTTP 401: no such model"):
        pull("ViT-L-14::openai", source="hub", log=lambda _: None)


@pytest.mark.parametrize(("failure", "message"), [("HTTP 500", "answered HTTP 500"), ("cut", "failed .*resume")])
def test_an_interrupted_pull_is_never_loaded_and_the_next_pull_completes_it(
    hub: FakeHub, home: Path, failure: str, message: str
) -> None:
    hub.fail_blob_of, hub.failure = "textual/model.onnx", failure
    with pytest.raises(DownloadError, match=message) as caught:
        pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert "\n" not in str(caught.value)
    snapshot = _snapshot(hub.main)
    assert (snapshot / "visual" / "model.onnx").is_file() and not (snapshot / "textual" / "model.onnx").exists()
    with pytest.raises(BadBundle, match=r"ViT-B-32__openai in .* is incomplete \(textual/model\.onnx missing\)"):
        ensure_bundle("ViT-B/32", download=False)
    hub.fail_blob_of = None
    assert ensure_bundle("ViT-B/32").root == snapshot  # online, the partial snapshot is completed, not trusted
    assert _tree(snapshot) == {f: hub.commits[hub.main][f] for f in RUNTIME_FILES}


def test_unreachable_hub_gives_one_clear_message(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:9") as caught:
        pull("ViT-B-32::openai", source="hub", log=lambda _: None)
    assert "\n" not in str(caught.value)


def test_offline_missing_model_says_what_to_pull(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match=r"clipworks models pull ViT-B-16::openai.*path of a bundle folder") as e:
        ensure_bundle("ViT-B/16")
    assert " --" not in str(e.value) and e.value.setting == "model"  # the library names no flag; the CLI does
    (tmp_path / "a.jpg").write_bytes(b"")
    assert main(["embed", "images", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "o.npy"), "-m", "ViT-B/16"]) == 1
    assert capsys.readouterr().err.startswith("error: --model: ViT-B-16::openai is not downloaded")


def test_missing_path_is_not_mistaken_for_a_name(home: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model path .*nowhere does not exist"):
        ensure_bundle("./nowhere")


def _prefill_hf_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "0123abcd" * 5) -> Path:
    """A snapshot as huggingface_hub leaves it: content-addressed blobs, relative links, ``refs/main``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return root / "snapshots" / commit


# Where huggingface_hub puts its cache for each setting (and which one wins when two are set).
CACHE_LOCATIONS = [
    ({"HF_HUB_CACHE": "a"}, "a"),
    ({"HUGGINGFACE_HUB_CACHE": "b"}, "b"),
    ({"HF_HOME": "c"}, "c/hub"),
    ({"XDG_CACHE_HOME": "d"}, "d/huggingface/hub"),
    ({"HF_HUB_CACHE": "a", "HUGGINGFACE_HUB_CACHE": "b", "HF_HOME": "c"}, "a"),
    ({"HF_HOME": "c", "XDG_CACHE_HOME": "d"}, "c/hub"),
]


@pytest.mark.parametrize(("env", "cache"), CACHE_LOCATIONS)
def test_prefilled_hugging_face_cache_is_used_offline(
    home: Path, tmp_path: Path, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, env: dict, cache: str
) -> None:
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {f: d for f, d in _repo_files(vit_bundle, tmp_path).items() if f in RUNTIME_FILES}
    snapshot = _prefill_hf_cache(tmp_path / cache, REPO, files)
    assert ensure_bundle("ViT-B/32").root == snapshot


@pytest.mark.parametrize("missing", ["textual/model.onnx", "textual/tokenizer.json", "visual/preprocess_cfg.json"])
def test_a_partial_snapshot_is_refused_offline_with_the_missing_file(
    home: Path, tmp_path: Path, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {f: d for f, d in _repo_files(vit_bundle, tmp_path).items() if f in RUNTIME_FILES - {missing}}
    _prefill_hf_cache(tmp_path / "hf", REPO, files)
    with pytest.raises(BadBundle, match=rf"incomplete \({missing}\ missing\).*pull it again") as caught:
        ensure_bundle("ViT-B/32")
    assert "\n" not in str(caught.value)


def test_models_list_shows_where_each_bundle_comes_from_and_what_is_cached(
    home: Path, tmp_path: Path, vit_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {f: d for f, d in _repo_files(vit_bundle, tmp_path).items() if f in RUNTIME_FILES}
    snapshot = _prefill_hf_cache(tmp_path / "hf", REPO, files)
    _prefill_hf_cache(tmp_path / "hf", "immich-app/ViT-B-32__laion2b-s34b-b79k", {"config.json": files["config.json"]})
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == len(list_models())
    assert rows["ViT-B-32::openai"]["hub_repo"] == REPO and rows["ViT-B-32::openai"]["cached"] == str(snapshot)
    laion = rows["ViT-B-32::laion2b_s34b_b79k"]
    assert laion["hub_repo"] == "immich-app/ViT-B-32__laion2b-s34b-b79k"
    assert laion["cached"] is None and "visual/model.onnx" in laion["incomplete"]
    assert rows["ViT-L-14::datacomp_xl_s13b_b90k"]["hub_repo"] is None
    assert main(["models", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "export-only" in lines["ViT-L-14::datacomp_xl_s13b_b90k"]
    assert lines["ViT-B-32::openai"].endswith(str(snapshot))
    assert "immich-app/ViT-B-32__laion2b-s34b-b79k" in lines["ViT-B-32::laion2b_s34b_b79k"]
    assert lines["ViT-B-32::laion2b_s34b_b79k"].endswith("incomplete: pull again")


def test_models_list_filters_by_family_and_by_ready_bundle(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--family", "siglip", "--json"]) == 0
    siglip = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in siglip}
    assert {"ViT-B-16-SigLIP2::webli", "ViT-SO400M-16-SigLIP2-384::webli", "ViT-B-16-SigLIP::webli"} <= names
    assert all(r["family"] == "siglip" for r in siglip) and "ViT-B-32::openai" not in names
    assert main(["models", "list", "--downloadable", "--json"]) == 0
    ready = json.loads(capsys.readouterr().out)
    assert ready and all(r["hub_repo"] for r in ready)
    assert {r["name"] for r in ready} == {m.name for m in list_models() if m.hf_repo}
    assert main(["models", "list", "--family", "siglip", "--downloadable"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "alias", "family"]
    assert len(lines) - 1 == sum(1 for r in siglip if r["hub_repo"])
    assert all(" siglip " in line and "export-only" not in line for line in lines[1:])


def test_models_list_refuses_an_unknown_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--family", "sigclip"]) == 2
    err = capsys.readouterr().err
    assert "--family 'sigclip' is not a model family; choose from clip, siglip" in err and err.count("\n") == 1


def test_models_list_shows_cached_random_exports(
    home: Path, vit_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`::random` bundles (and other exported tags) are in no record, but they are cached models too."""
    models = settings.models_dir()
    shutil.copytree(vit_bundle, models / "tiny-vit__random")
    (models / "ViT-B-32__random" / "visual").mkdir(parents=True)  # an interrupted copy: no config.json
    (models / ".ViT-L-14__random.partial-12").mkdir()  # an export still being written
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    tiny = rows["tiny-vit::random"]
    assert (tiny["family"], tiny["dim"], tiny["image_size"], tiny["hub_repo"]) == ("clip", 32, 64, None)
    assert tiny["cached"] == str(models / "tiny-vit__random")
    assert rows["ViT-B-32::random"]["cached"] is None and "config.json" in rows["ViT-B-32::random"]["incomplete"]
    assert not any("partial" in name for name in rows)
    assert main(["models", "list", "--family", "clip"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["tiny-vit::random"].endswith(str(models / "tiny-vit__random"))
    assert "ViT-B-32::random" not in lines  # its family cannot be read, so it is no "clip"


def _runtime_only(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a runtime-only install runs it: torch and open_clip cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['open_clip'] = None\n"
        "from clipworks.cli.main import main\n"
        "rc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('huggingface_hub', 'torch', 'open_clip') if sys.modules.get(m))\n"
        "print('imported:', ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env, "PYTHONPATH": str(SRC)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_pulling_an_export_only_name_without_torch_says_what_to_install(hub: FakeHub, home: Path) -> None:
    done = _runtime_only(["models", "pull", "ViT-B-32::datacomp_xl_s13b_b90k"], {})
    errors = [line for line in done.stderr.splitlines() if not line.startswith("imported:")]
    assert done.returncode == 1
    assert len(errors) == 1 and "export-only" in errors[0] and "pip install 'clipworks[export]'" in errors[0]
    assert hub.hub_requests == []


def test_without_torch_a_pull_downloads_and_listing_imports_neither_torch_nor_the_hub_client(
    hub: FakeHub, home: Path
) -> None:
    done = _runtime_only(["models", "pull", "ViT-B/32"], {})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == _snapshot(hub.main)
    listed = _runtime_only(["models", "list"], {})
    assert listed.returncode == 0 and str(_snapshot(hub.main)) in listed.stdout
    assert "imported: \n" in listed.stderr  # names and the cache are read without torch, open_clip or huggingface_hub


# Settings read like huggingface_hub reads them; checked against the installed huggingface_hub itself.
HUB_SETTINGS_CASES = [
    {},
    *[env for env, _ in CACHE_LOCATIONS],
    {"HF_TOKEN_PATH": "t/token", "HF_HOME": "c"},
    {"HF_ENDPOINT": "http://127.0.0.1:5/", "HF_HUB_OFFLINE": "1"},
    {"HF_HUB_OFFLINE": "true"},
    {"HF_HUB_OFFLINE": "ON"},
    {"HF_HUB_OFFLINE": "0"},
    {"TRANSFORMERS_OFFLINE": "yes"},
]


def test_hugging_face_settings_match_the_installed_huggingface_hub(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [{k: (str(tmp_path / v) if k not in {"HF_ENDPOINT"} and "OFFLINE" not in k else v)
              for k, v in env.items()} for env in HUB_SETTINGS_CASES]  # fmt: skip
    code = (
        "import importlib, json, os, sys\n"
        "import huggingface_hub.constants as c\n"
        f"names = {HF_VARS!r}\n"
        "for env in json.loads(sys.argv[1]):\n"
        "    for n in names: os.environ.pop(n, None)\n"
        "    os.environ.update(env)\n"
        "    importlib.reload(c)\n"
        "    print(json.dumps([c.HF_HUB_CACHE, c.HF_TOKEN_PATH, c.ENDPOINT, c.HF_HUB_OFFLINE]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for env, line in zip(cases, done.stdout.splitlines(), strict=True):
        for name in HF_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ours = [str(settings.hf_hub_cache()), str(settings.hf_token_path()), settings.hf_endpoint(), settings.offline()]
        assert ours == json.loads(line), env


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


# -- bundle sources: hf-hub: and local-dir: prefixes wherever a model name goes ---------------------------


def test_prefixed_names_take_their_bundle_from_that_source(
    home: Path, tmp_path: Path, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {f: d for f, d in _repo_files(vit_bundle, tmp_path).items() if f in RUNTIME_FILES}
    # Any repository with an Immich-layout bundle, not only the registry's names.
    snapshot = _prefill_hf_cache(tmp_path / "hf", "someone/my-clip", files)
    assert ensure_bundle("hf-hub:someone/my-clip").root == snapshot
    assert ensure_bundle(f"local-dir:{vit_bundle}").root == vit_bundle
    assert clipworks.load(f"local-dir:{vit_bundle}", device="cpu").encode_texts(["a cat"]).shape == (1, 32)
    # The CLI takes them as --model too, and a prompt file records the name as given.
    assert main(["embed", "texts", "a cat", "-o", str(tmp_path / "t.json"), "-m", "hf-hub:someone/my-clip"]) == 0
    assert '"hf-hub:someone/my-clip"' in (tmp_path / "t.json").read_text()


def test_a_prefixed_hub_name_is_pulled_and_then_found_offline(
    hub: FakeHub, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull", f"hf-hub:{REPO}"]) == 0
    assert Path(capsys.readouterr().out.strip()) == _snapshot(hub.main)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ensure_bundle(f"hf-hub:{REPO}").root == _snapshot(hub.main)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("local-dir:{tmp}/nowhere", r"model folder .*nowhere does not exist"),
        ("local-dir:{tmp}/file.onnx", r"model folder .*file\.onnx is a file, not a folder"),
        ("local-dir:", r"names no local-dir target: write local-dir:TARGET"),
        ("hf-hub:", r"names no hf-hub target"),
        ("hf-hub:someone/absent", r"hf-hub:someone/absent is not on this machine and downloads are off"),
    ],
)
def test_bad_prefixed_names_are_refused_naming_them(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "file.onnx").write_bytes(b"onnx")
    with pytest.raises(ModelNotFound, match=message) as caught:
        ensure_bundle(name.format(tmp=tmp_path))
    assert caught.value.setting == "model"


def test_an_unknown_pull_source_names_the_flag(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "pull", "ViT-B/32", "--source", "ftp"]) == 2
    assert capsys.readouterr().err.strip() == "error: --source: unknown pull source 'ftp': use auto, hub or export"


def test_models_info_shows_the_provider_and_options_the_session_uses(
    vit_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "info", str(vit_bundle), "--json", "--threads", "1", "--device", "cpu"]) == 0
    runtime = json.loads(capsys.readouterr().out)["runtime"]
    assert runtime["backend"] == "cpu" and runtime["providers"] == ["CPUExecutionProvider"]
    assert runtime["provider_options"] == {"CPUExecutionProvider": {}}
    # Read back from ONNX Runtime's session, so what is shown is what runs.
    assert runtime["intra_op_threads"] == 1 and runtime["inter_op_threads"] == 1 and runtime["cpu_arena"] is True
    assert runtime["session_config"] == {"session.intra_op.allow_spinning": "1"}
    assert runtime["io_binding"] is False
    assert main(["models", "info", str(vit_bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["runtime.providers", '["CPUExecutionProvider"]'] for line in lines)


@pytest.mark.parametrize(
    ("name", "fetchable"),
    [
        ("ViT-B/32", True),
        ("hf-hub:someone/my-clip", True),  # a server may start with it and pull on the first request
        ("local-dir:/models/mine", False),  # nothing can bring a missing folder
        ("./nowhere", False),
        ("no-such-model", False),
    ],
)
def test_what_a_pull_could_bring(name: str, fetchable: bool) -> None:
    assert can_fetch(name) is fetchable


@pytest.mark.parametrize(
    ("name", "starts"), [("hf-hub:someone/not-yet-pulled", True), ("local-dir:/models/none", False)]
)
def test_a_server_starts_with_a_hub_name_it_has_not_pulled_yet(home: Path, name: str, starts: bool) -> None:
    from clipworks.service.state import ModelHolder, ServiceSettings

    holder = ModelHolder(ServiceSettings(model=name))
    if starts:
        holder.check()  # the first request pulls it
    else:
        with pytest.raises(ModelNotFound, match="does not exist"):
            holder.check()
