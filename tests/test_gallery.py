"""The web gallery of the photo library (``clipworks serve --db``): the JSON search API, thumbnails, originals,
refusals of anything not in the index, auth and the CLI wiring (the page in a browser: test_gallery_browser.py)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipworks.cli.main import main
from clipworks.library import Library
from clipworks.runtime.encoder import ClipModel
from clipworks.service import ServiceSettings, create_app, gallery
from library_helpers import file_ids, make_variants

QUERIES = ["a photo of a dog", "building -fruit", "2:butterfly +squirrel", "monkey"]


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def library(model, photos, tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("gallery") / "photos"
    root.mkdir()
    for p in photos:
        shutil.copy(p, root / p.name)
    make_variants(photos, root / "more", 6)
    lib = Library(root.parent / "lib.db", model, create=True)
    lib.index([root], batch_size=8)
    yield lib
    lib.close()


def make_app(model, library, tmp_path: Path, **kw):
    settings = ServiceSettings(tags=["dog", "cat"], tags_cache_dir=tmp_path / "tags", **kw)
    return create_app(settings, model=model, library=library, routers=[gallery.router])


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Thumbnails go under the clipworks cache dir: a fresh one per test."""
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def client(model, library, tmp_path_factory):
    with TestClient(make_app(model, library, tmp_path_factory.mktemp("svc"))) as c:
        yield c


@pytest.fixture
def no_image_encoding(monkeypatch) -> list[int]:
    """Counts image encodings: a search by an indexed photo must reuse its stored vector."""
    calls: list[int] = []
    original = ClipModel.embed_image_batch

    def spy(self, pixels, normalize=True):  # type: ignore[no-untyped-def]
        calls.append(len(pixels))
        return original(self, pixels, normalize)

    monkeypatch.setattr(ClipModel, "embed_image_batch", spy)
    return calls


def ids_of(library: Library) -> dict[str, int]:
    return file_ids(library.path)


# -- search API -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", QUERIES)
def test_text_search_matches_library_search(client, library, query) -> None:
    r = client.get("/api/search", params={"q": query, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    want = library.search(query, top_k=7)
    assert body["count"] == len(want) == 7
    assert [h["path"] for h in body["results"]] == [h.path for h in want]
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h.score for h in want], atol=1e-4)
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    ids = ids_of(library)
    for hit in body["results"]:
        assert hit["id"] == ids[hit["path"]]
        assert (hit["thumb"], hit["original"]) == (f"/thumb/{hit['id']}", f"/original/{hit['id']}")
        assert hit["name"] == os.path.basename(hit["path"])


def test_text_search_goes_through_the_batching_worker(client) -> None:
    stats = client.app.state.clip.batcher.stats
    before = stats.batches
    assert client.get("/api/search", params={"q": "a red fruit"}).status_code == 200
    assert stats.batches == before + 1


def test_search_by_id_uses_the_stored_vector(client, library, photos, no_image_encoding) -> None:
    path = str(Path(library.path).parent / "photos" / photos[2].name)
    file_id = ids_of(library)[path]
    want = library.search(images=[path], top_k=5)  # the library reuses stored vectors for indexed photos
    by_query = client.post(f"/api/search?id={file_id}&k=5")
    by_json = client.post("/api/search", json={"id": file_id, "k": 5})
    by_path = client.post("/api/search", json={"path": path, "k": 5})
    for r in (by_query, by_json, by_path):
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [h["path"] for h in results] == [h.path for h in want]
        assert results[0]["id"] == file_id and results[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert by_query.json()["query"] == {"id": file_id}
    assert no_image_encoding == [], "a search by an indexed photo re-encoded it"


def test_search_by_id_plus_text_combines_them(client, library, model) -> None:
    file_id = next(iter(ids_of(library).values()))
    example = library.store.vector(library.model_row, file_id)
    r = client.post("/api/search", json={"id": file_id, "q": "-building", "k": 4})
    assert r.status_code == 200, r.text
    text = model.encode_texts(["building"])[0]
    query = example - text / np.linalg.norm(text)
    want = library.search_vector(query / np.linalg.norm(query), top_k=4)
    assert [h["path"] for h in r.json()["results"]] == [h.path for h in want]
    assert r.json()["query"] == {"id": file_id, "q": "-building"}


@pytest.mark.parametrize("form", ["multipart", "json-base64"])
def test_search_by_uploaded_image(client, library, photos, form) -> None:
    data = photos[3].read_bytes()
    if form == "multipart":
        r = client.post("/api/search", files={"image": ("x.jpg", data, "image/jpeg")}, data={"k": "4"})
    else:
        r = client.post("/api/search", json={"image": base64.b64encode(data).decode(), "k": 4})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    assert results[0]["name"] == photos[3].name  # the same photo, encoded again, is its own best match
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("method", "url", "kw", "status"),
    [
        ("GET", "/api/search", {}, 422),
        ("GET", "/api/search?q=", {}, 422),
        ("GET", "/api/search?q=-people", {}, 400),  # negatives only
        ("GET", "/api/search?q=cat&k=0", {}, 422),
        ("GET", "/api/search?q=cat&k=100000", {}, 422),
        ("POST", "/api/search?id=999999", {}, 404),
        ("POST", "/api/search?id=abc", {}, 422),
        ("POST", "/api/search", {"json": {}}, 422),
        ("POST", "/api/search", {"json": {"id": 1, "path": "/x"}}, 422),
        ("POST", "/api/search", {"json": {"path": "/etc/passwd"}}, 404),
        ("POST", "/api/search", {"json": {"path": "../../etc/passwd"}}, 404),
        ("POST", "/api/search", {"json": {"image": "not an image"}}, 400),
        ("POST", "/api/search", {"content": b"{broken", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/api/search", {"files": {"other": ("a.txt", b"x")}}, 422),
        ("POST", "/api/search", {"files": {"image": ("a.jpg", b"not a jpeg")}}, 400),
        ("GET", "/thumb/999999", {}, 404),
        ("GET", "/thumb/0", {}, 422),
        ("GET", "/thumb/abc", {}, 422),
        ("GET", "/thumb/99999999999999999999999", {}, 422),
        ("GET", "/thumb/1?size=5000", {}, 422),
        ("GET", "/original/999999", {}, 404),
        ("GET", "/original/-1", {}, 422),
        ("GET", "/original/../../etc/passwd", {}, 404),
        ("GET", "/original/..%2F..%2Fetc%2Fpasswd", {}, 404),
        ("GET", "/original/%2e%2e/%2e%2e/etc/passwd", {}, 404),
        ("GET", "/thumb/1/../../../../etc/passwd", {}, 404),
    ],
)
def test_refusals(client, method, url, kw, status) -> None:
    r = client.request(method, url, **kw)
    assert r.status_code == status, r.text
    assert b"root:" not in r.content


# -- thumbnails and originals ---------------------------------------------------------------------


def test_thumbnail_made_once_then_cached(client, library, cache_home, monkeypatch) -> None:
    made: list[int] = []
    render = gallery.render_thumbnail

    def counting(source, target, size, at=None):  # type: ignore[no-untyped-def]
        made.append(size)
        return render(source, target, size, at)

    monkeypatch.setattr(gallery, "render_thumbnail", counting)
    path, file_id = next(iter(ids_of(library).items()))
    first = client.get(f"/thumb/{file_id}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(first.content)) as im:
        original = Image.open(path)
        assert im.format == "JPEG" and max(im.size) == 256
        assert abs(im.size[0] / im.size[1] - original.size[0] / original.size[1]) < 0.02  # aspect kept
    cached = list((cache_home / "thumbs").rglob("*.jpg"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns

    second = client.get(f"/thumb/{file_id}")
    assert second.content == first.content and made == [256]
    assert cached[0].stat().st_mtime_ns == stamp
    assert "max-age" in second.headers["cache-control"]
    unchanged = client.get(f"/thumb/{file_id}", headers={"If-None-Match": first.headers["etag"]})
    assert unchanged.status_code == 304 and made == [256]

    assert client.get(f"/thumb/{file_id}?size=128").status_code == 200 and len(made) == 2
    st = os.stat(path)
    root = Path(library.path).parent / "photos"
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the photo changed
    try:
        # Not what the index recorded: not served until the next index run records it, then a new thumbnail.
        assert client.get(f"/thumb/{file_id}").status_code == 404 and len(made) == 2
        library.index([root])
        again = client.get(f"/thumb/{file_id}")
        assert again.status_code == 200 and len(made) == 3
        assert again.headers["etag"] != first.headers["etag"]
        assert len(list((cache_home / "thumbs").rglob(f"{file_id}-256-*.jpg"))) == 1  # the stale one is gone
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        library.index([root])


def test_original_is_the_file(client, library) -> None:
    path, file_id = sorted(ids_of(library).items())[-1]
    r = client.get(f"/original/{file_id}")
    assert r.status_code == 200, r.text
    assert r.content == Path(path).read_bytes()
    assert r.headers["content-type"] == "image/jpeg"


def test_deleted_and_vanished_files_are_not_served(model, photos, tmp_path) -> None:
    root = tmp_path / "few"
    root.mkdir()
    for p in photos[:3]:
        shutil.copy(p, root / p.name)
    lib = Library(tmp_path / "few.db", model, create=True)
    lib.index([root])
    ids = file_ids(lib.path)
    deleted, vanished, kept = (ids[str(root / p.name)] for p in photos[:3])
    with TestClient(make_app(model, lib, tmp_path)) as c:
        for file_id in (deleted, vanished, kept):
            assert c.get(f"/original/{file_id}").status_code == 200
        (root / photos[0].name).unlink()
        lib.index([root])  # now marked deleted in the index
        (root / photos[1].name).unlink()  # gone from disk, not yet re-indexed
        for url in (f"/thumb/{deleted}", f"/original/{deleted}", f"/thumb/{vanished}", f"/original/{vanished}"):
            assert c.get(url).status_code == 404, url
        assert c.post(f"/api/search?id={deleted}").status_code == 404
        names = [h["name"] for h in c.get("/api/search", params={"q": "photo", "k": 10}).json()["results"]]
        assert photos[0].name not in names and photos[2].name in names
        assert c.get(f"/thumb/{kept}").status_code == 200
    lib.close()


# -- the page, auth, no library, the CLI ----------------------------------------------------------


def test_page_and_library_info(client, library) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="q"' in r.text and "/api/search" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    info = client.get("/api/library").json()
    assert (info["photos"], info["moments"], info["model"]) == (len(ids_of(library)), 0, library.model_row.name)
    assert info["folders"] == [root for root, _ in library.store.roots()]


def test_api_key_applies_to_the_gallery(model, library, tmp_path) -> None:
    file_id = next(iter(ids_of(library).values()))
    urls = ["/", "/api/library", "/api/search?q=dog", f"/thumb/{file_id}", f"/original/{file_id}"]
    with TestClient(make_app(model, library, tmp_path, api_key="s3cret")) as c:
        for url in urls:
            assert c.get(url).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200, url
        assert c.post(f"/api/search?id={file_id}").status_code == 401


def test_without_a_library_the_gallery_says_to_pass_db(model, tmp_path) -> None:
    with TestClient(make_app(model, None, tmp_path)) as c:
        r = c.get("/")
        assert r.status_code == 404 and "--db" in r.text
        for method, url in (("GET", "/api/search?q=dog"), ("POST", "/api/search?id=1"), ("GET", "/thumb/1")):
            r = c.request(method, url)
            assert r.status_code == 404 and "--db" in r.json()["detail"], url


def test_serve_with_db_mounts_the_gallery_with_the_library_model(library, vit_bundle, monkeypatch, capsys) -> None:
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.delenv("CLIPWORKS_MODEL", raising=False)
    assert main(["serve", "--db", str(library.path), "--port", "8123"]) == 0
    state = served["app"].state.clip
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    assert Path(state.library.path) == Path(library.path)
    assert state.holder.loaded and state.model.name == library.model_row.name  # the library's model, no --model
    assert "gallery of" in capsys.readouterr().err
    with TestClient(served["app"]) as c:
        assert c.get("/").status_code == 200
        want = [h.path for h in library.search("a dog", top_k=3)]
        assert [h["path"] for h in c.get("/api/search?q=a dog&k=3").json()["results"]] == want

    served.clear()
    assert main(["serve"]) == 0  # no --db: the page tells how to get one
    with TestClient(served["app"]) as c:
        assert c.get("/").status_code == 404


def test_serve_with_a_missing_db_fails_clearly(tmp_path, capsys) -> None:
    assert main(["serve", "--db", str(tmp_path / "nope.db")]) == 2
    assert "nope.db" in capsys.readouterr().err
