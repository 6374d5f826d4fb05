"""The HTTP service through the real app: Automatic1111's interrogate contract, the encoder routes, limits,
auth, metrics, the batcher, and a real uvicorn server on loopback for an unmodified client and concurrency."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipworks.service import ServiceSettings, create_app
from clipworks.service.batcher import Batcher, QueueFull
from clipworks.zeroshot import TagIndex
from conftest import serve_app

TAGS = ["dog", "cat", "building", "fruit", "monkey", "butterfly", "football", "squirrel"]


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def images(photos) -> list[bytes]:
    return [p.read_bytes() for p in photos[:4]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise_png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def settings(tmp_path: Path, **kw) -> ServiceSettings:
    return ServiceSettings(tags=TAGS, tags_cache_dir=tmp_path / "tags", **kw)


@pytest.fixture
def client(model, tmp_path):
    with TestClient(create_app(settings(tmp_path), model=model)) as c:
        yield c


def expected_interrogation(model, data: bytes, threshold: float = 0.22, top: int = 10):
    index = TagIndex.build(model, TAGS, use_cache=False)
    return index.interrogate(model.encode_images([data]), threshold, top)[0]


# -- Automatic1111 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["raw", "data-url"])
def test_a1111_interrogate_success(client, model, images, form) -> None:
    encoded = b64(images[0]) if form == "raw" else "data:image/jpeg;base64," + b64(images[0])
    r = client.post("/sdapi/v1/interrogate", json={"image": encoded, "model": "clip"})
    assert r.status_code == 200, r.text
    body = r.json()
    expect = expected_interrogation(model, images[0])
    assert body["caption"] == expect.caption and body["caption"]
    assert [t["tag"] for t in body["interrogations"]] == [t.tag for t in expect.tags]
    assert body["interrogations"][0]["score"] == pytest.approx(expect.tags[0].score, abs=1e-4)


def test_a1111_model_defaults_to_clip(client, images) -> None:
    assert client.post("/sdapi/v1/interrogate", json={"image": b64(images[1])}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"image": "", "model": "clip"}, 500, "Invalid encoded image"),
        ({"image": "this is not an image!", "model": "clip"}, 500, "Invalid encoded image"),
        ({"image": b64(b"GIF89a but not really"), "model": "clip"}, 500, "Invalid encoded image"),
        ({"image": "data:image/png;base64,", "model": "clip"}, 500, "Invalid encoded image"),
        ({"image": "{truncated}", "model": "blip"}, 500, "Invalid encoded image"),  # decoded before the model
        ({"image": "{good}", "model": "blip"}, 404, "Model not found"),
        # URL images are off unless their host is allowed: Automatic1111's answer with api_enable_requests off.
        ({"image": "http://127.0.0.1:9/photo.jpg", "model": "clip"}, 500, "Requests not allowed"),
        ({"image": "https://example.com/photo.jpg", "model": "clip"}, 500, "Requests not allowed"),
    ],
)
def test_a1111_errors_match_automatic1111(client, images, body, status, detail) -> None:
    if body["image"] == "{good}":
        body = {**body, "image": b64(images[0])}
    if body["image"] == "{truncated}":  # a real JPEG cut short: its header reads, its pixels do not
        body = {**body, "image": b64(images[0][: len(images[0]) // 3])}
    r = client.post("/sdapi/v1/interrogate", json=body)
    assert r.status_code == status, r.text
    # stable-diffusion-webui's api_middleware answers HTTPExceptions with this body; `errors` is str(e), which
    # is empty for the HTTPException of starlette 0.26 (fastapi 0.94, which Automatic1111 pins).
    assert r.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"image": 5}', b'{"image": "x", "model": ["clip"]}', b'{"image": null}',
     b'{"image": null, "model": "clip"}'],
)  # fmt: skip
def test_a1111_malformed_body_is_422(client, content) -> None:
    # Automatic1111's InterrogateRequest.image is a plain str: null does not validate (its 404 is unreachable).
    r = client.post("/sdapi/v1/interrogate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)


def test_a1111_undecodable_image_is_checked_before_the_model(client) -> None:
    r = client.post("/sdapi/v1/interrogate", json={"image": b64(b"junk"), "model": "nope"})
    assert r.status_code == 500  # as Automatic1111: decode_base64_to_image runs first


@contextlib.contextmanager
def file_server(files: dict[str, bytes], redirect_to: str | None = None):
    """A real HTTP server on 127.0.0.1 serving ``files`` (and ``/moved``, a redirect to ``redirect_to``)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/moved" and redirect_to:
                self.send_response(302)
                self.send_header("Location", redirect_to)
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a1111_url_images_only_from_allowed_hosts(model, images, tmp_path) -> None:
    with file_server({"/photo.jpg": images[0], "/notes.jpg": b"not an image"}) as url, \
         file_server({}, redirect_to=f"{url}/photo.jpg") as other:  # fmt: skip
        app = create_app(settings(tmp_path, image_url_hosts=("127.0.0.1",)), model=model)
        with TestClient(app) as client:
            r = client.post("/sdapi/v1/interrogate", json={"image": f"{url}/photo.jpg"})
            assert r.status_code == 200, r.text
            assert r.json()["caption"] == expected_interrogation(model, images[0]).caption
            for bad in (f"{url}/notes.jpg", f"{url}/missing.jpg", f"{other}/moved"):  # no redirect is followed
                r = client.post("/sdapi/v1/interrogate", json={"image": bad})
                assert (r.status_code, r.json()["detail"]) == (500, "Invalid image url"), bad
            r = client.post("/sdapi/v1/interrogate", json={"image": f"http://localhost:{url.rsplit(':', 1)[1]}/x"})
            assert (r.status_code, r.json()["detail"]) == (500, "Requests not allowed")  # not on the list


def test_a1111_deepdanbooru_is_answered_with_the_same_tags(client, images) -> None:
    clip = client.post("/sdapi/v1/interrogate", json={"image": b64(images[0]), "model": "clip"})
    danbooru = client.post("/sdapi/v1/interrogate", json={"image": b64(images[0]), "model": "deepdanbooru"})
    assert clip.status_code == danbooru.status_code == 200, danbooru.text
    assert danbooru.json()["caption"] == clip.json()["caption"]


def test_structured_output_sums_to_one_per_category(client, model, images) -> None:
    categories = {"age group": ["child", "adult", "senior"], "clothing colour": ["red", "blue", "black", "white"]}
    r = client.post("/sdapi/v1/interrogate/structured", json={"image": b64(images[2]), "categories": categories})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["results"]) == set(categories)
    emb = model.encode_images([images[2]])[0]
    for name, labels in categories.items():
        res = body["results"][name]
        assert sum(res["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        cos = model.encode_texts([f"a photo of a {x}." for x in labels]) @ emb
        assert res["winner"] == labels[int(np.argmax(cos))]
        assert res["confidence"] == pytest.approx(max(res["probs"].values()))
    assert body["general_tags"] == [t.tag for t in expected_interrogation(model, images[2]).tags]


@pytest.mark.parametrize(
    "categories", [None, "age", ["child", "adult"], {}, {"age": []}, {"age": "child"}, {"age": [1, 2]}]
)
def test_structured_refuses_bad_categories_with_400(client, images, categories) -> None:
    body = {"image": b64(images[0])} if categories is None else {"image": b64(images[0]), "categories": categories}
    r = client.post("/sdapi/v1/interrogate/structured", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "HTTPException"


# -- encoder routes --------------------------------------------------------------------------------


def test_embeddings_json_texts_and_images_match_the_model(client, model, images) -> None:
    texts = ["a dog", "a photo of a building", "x"]
    r = client.post("/v1/embeddings", json={"texts": texts, "images": [b64(i) for i in images[:2]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model.name and body["dim"] == model.embed_dim == 32
    assert [d["type"] for d in body["data"]] == ["text"] * 3 + ["image"] * 2
    assert [d["index"] for d in body["data"]] == list(range(5))
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got[:3], model.encode_texts(texts), atol=1e-5)
    np.testing.assert_allclose(got[3:], model.encode_images(images[:2]), atol=1e-5)


def test_embeddings_base64_float32_and_multipart_upload(client, model, images) -> None:
    r = client.post("/v1/embeddings", json={"images": [b64(images[0])], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, model.encode_images([images[0]])[0], atol=1e-5)
    files = [("images", ("a.jpg", images[1], "image/jpeg")), ("images", ("b.jpg", images[3], "image/jpeg"))]
    r = client.post("/v1/embeddings", files=files, data={"texts": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got[:2], model.encode_texts(["a cat", "a dog"]), atol=1e-5)
    np.testing.assert_allclose(got[2:], model.encode_images([images[1], images[3]]), atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({}, 400, "give 'texts' and/or 'images'"),
        ({"images": ["bm90IGFuIGltYWdl"]}, 400, "images[0]"),
        ({"texts": "not a list"}, 422, None),
        ({"texts": ["a"], "encoding_format": "int4"}, 422, None),
        ({"texts": ["a"], "surprise": 1}, 422, None),
    ],
)
def test_embeddings_bad_requests(client, body, status, detail) -> None:
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    if detail:
        assert detail in r.json()["detail"]


def test_classify_and_rank_routes(client, model, images) -> None:
    labels = ["dog", "cat", "building", "fruit"]
    r = client.post("/v1/classify", json={"images": [b64(images[0]), b64(images[2])], "labels": labels, "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(len(row) == 3 for row in results)
    emb = model.encode_images([images[0], images[2]])
    txt = model.encode_texts([f"a photo of a {x}." for x in labels])
    for row, e in zip(results, emb, strict=True):
        logits = model.logit_scale * txt @ e
        assert [x["label"] for x in row] == [labels[i] for i in np.argsort(-logits)[:3]]
        assert row[0]["logit"] == pytest.approx(float(logits.max()), abs=1e-3)

    texts = ["a squirrel", "a city", "fruit on a table", "a squirrel"]
    r = client.post("/v1/rank", json={"image": b64(images[3]), "texts": texts})
    assert r.status_code == 200, r.text
    ranking = r.json()["ranking"]
    cos = model.encode_texts(texts) @ model.encode_images([images[3]])[0]
    assert [x["index"] for x in ranking] == list(np.argsort(-cos, kind="stable"))
    assert [x["score"] for x in ranking] == pytest.approx(sorted(cos, reverse=True), abs=1e-5)
    assert sum(x["prob"] for x in ranking) == pytest.approx(1.0, abs=1e-5)
    assert client.post("/v1/classify", json={"labels": labels}).status_code == 400
    assert client.post("/v1/rank", json={"image": b64(images[0]), "texts": []}).status_code == 422


def test_health_metrics_and_docs(client, images) -> None:
    assert client.post("/v1/embeddings", json={"texts": ["a"], "images": [b64(images[0])]}).status_code == 200
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["loaded"] and health["worker"]
    text = client.get("/metrics").text
    assert 'clipworks_requests_total{method="POST",route="/v1/embeddings",status="200"} 1.0' in text
    assert 'clipworks_request_duration_seconds_count{route="/v1/embeddings"} 1.0' in text
    assert 'clipworks_batch_size_count{kind="image"}' in text and "clipworks_queue_depth 0.0" in text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/sdapi/v1/interrogate", "/sdapi/v1/interrogate/structured", "/v1/embeddings", "/v1/rank"):
        assert path in paths


# -- auth and limits -------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_healthz(model, tmp_path, images) -> None:
    with TestClient(create_app(settings(tmp_path, api_key="s3cret"), model=model)) as c:
        body = {"image": b64(images[0])}
        assert c.get("/healthz").status_code == 200
        routes = [
            ("post", "/sdapi/v1/interrogate", {"json": body}),
            ("get", "/metrics", {}),
            ("get", "/docs", {}),
            ("post", "/v1/embeddings", {"json": {"texts": ["a"]}}),
        ]
        for method, path, kw in routes:
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            wrong = getattr(c, method)(path, headers={"Authorization": "Bearer nope"}, **kw)
            assert wrong.status_code == 401
            ok = getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **kw)
            assert ok.status_code == 200, (path, ok.text)


def test_without_api_key_routes_are_open(client, images) -> None:
    assert client.post("/sdapi/v1/interrogate", json={"image": b64(images[0])}).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_oversize_body_and_bomb_images_get_413(model, tmp_path, images) -> None:
    app = create_app(settings(tmp_path, max_body_bytes=100_000, max_pixels=250_000), model=model)
    with TestClient(app) as c:
        big = {"image": b64(b"\0" * 120_000)}
        r = c.post("/sdapi/v1/interrogate", json=big)
        assert r.status_code == 413 and "over the limit" in r.json()["detail"]
        for data in (png_header(30_000, 30_000), png_header(600, 500)):  # Pillow's own bomb limit; ours
            r = c.post("/sdapi/v1/interrogate", json={"image": b64(data)})
            assert r.status_code == 413, r.text
            r = c.post("/v1/embeddings", json={"images": [b64(data)]})
            assert r.status_code == 413, r.text
        # The worker survives all of it.
        assert c.post("/sdapi/v1/interrogate", json={"image": b64(images[0])}).status_code == 200


class GatedModel:
    """The real model, but each image batch waits for a gate: lets a test fill the queue on purpose."""

    def __init__(self, model) -> None:
        self._model = model
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_image_batch(self, pixels, normalize=True):
        self.entered.set()
        assert self.gate.wait(20)
        return self._model.embed_image_batch(pixels, normalize)


def test_full_queue_answers_503_with_retry_after(model, tmp_path, images) -> None:
    gated = GatedModel(model)
    app = create_app(settings(tmp_path, max_batch=1, max_queue=2, max_wait_ms=0, retry_after=3), model=gated)
    body = {"images": [b64(images[0])]}
    with TestClient(app) as c, ThreadPoolExecutor(3) as pool:
        batcher = app.state.clip.batcher
        first = pool.submit(c.post, "/v1/embeddings", json=body)
        assert gated.entered.wait(10)  # the worker holds job 1
        waiting = [pool.submit(c.post, "/v1/embeddings", json=body) for _ in range(2)]
        deadline = time.monotonic() + 10
        while batcher.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.depth == 2
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        r = c.post("/sdapi/v1/interrogate", json={"image": b64(images[0])})
        assert r.status_code == 503 and r.json()["error"] == "HTTPException"
        gated.gate.set()
        assert [f.result().status_code for f in [first, *waiting]] == [200, 200, 200]
        assert c.post("/v1/embeddings", json=body).status_code == 200


# -- the batcher alone -----------------------------------------------------------------------------


class FakeModel:
    """Image 'pixels' are numbers; a negative one poisons its batch."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_image_batch(self, pixels):
        self.calls.append(len(pixels))
        if (pixels < 0).any():
            raise ValueError("poison")
        return np.repeat(pixels.reshape(len(pixels), 1), 4, axis=1).astype(np.float32)

    def encode_texts(self, texts, batch_size=256):
        return np.array([[len(t)] * 4 for t in texts], np.float32)


def test_batcher_gathers_jobs_and_isolates_a_failing_one() -> None:
    batches: list[int] = []
    fake = FakeModel()
    b = Batcher(lambda: fake, max_batch=8, max_wait_ms=200, on_batch=lambda k, n, s: batches.append(n))
    try:
        futures = [b.submit("image", [np.float32(i)]) for i in range(5)]
        futures.append(b.submit("image", [np.float32(-1)]))
        futures.append(b.submit("text", ["abc", "de"]))
        for i in range(5):
            np.testing.assert_array_equal(futures[i].result(5), [[i] * 4])
        with pytest.raises(ValueError, match="poison"):
            futures[5].result(5)
        np.testing.assert_array_equal(futures[6].result(5), [[3] * 4, [2] * 4])
        # The six image jobs went in together, failed, and were retried one by one; the texts ran beside them.
        assert fake.calls == [6, 1, 1, 1, 1, 1, 1]
        assert sorted(batches) == [1, 1, 1, 1, 1, 2]
        assert b.submit("image", [np.float32(7)]).result(5)[0, 0] == 7  # the worker lives on
        with pytest.raises(ValueError):
            b.submit("image", [])
    finally:
        b.stop()
    assert not b.alive


def test_batcher_refuses_beyond_its_queue_limit() -> None:
    release = threading.Event()

    class Slow(FakeModel):
        def encode_texts(self, texts, batch_size=256):
            release.wait(10)
            return super().encode_texts(texts)

    b = Batcher(lambda: Slow(), max_batch=1, max_wait_ms=0, max_queue=3)
    try:
        running = b.submit("text", ["a"])
        while b.depth:  # wait until the worker has taken it
            time.sleep(0.005)
        queued = [b.submit("text", ["b", "c"]), b.submit("text", ["d"])]
        with pytest.raises(QueueFull):
            b.submit("text", ["e"])
        release.set()
        assert [f.result(5).shape[0] for f in [running, *queued]] == [1, 2, 1]
    finally:
        release.set()
        b.stop()


def test_model_loads_on_first_use_or_at_start_with_a_log_line(vit_bundle, tmp_path, images, caplog) -> None:
    caplog.set_level(logging.INFO, logger="clipworks.service")
    app = create_app(settings(tmp_path, model=str(vit_bundle)))
    with TestClient(app) as c:
        assert "will load on the first request" in caplog.text
        health = c.get("/healthz")  # not ready: a load balancer must not count on it yet
        assert health.status_code == 503 and health.json()["loaded"] is False
        assert "loads on the first request" in health.json()["reason"]
        assert c.post("/v1/embeddings", json={"texts": ["a"]}).status_code == 200
        health = c.get("/healthz")
        assert "(first request)" in caplog.text and health.status_code == 200 and health.json()["loaded"] is True
    caplog.clear()
    with TestClient(create_app(settings(tmp_path, model=str(vit_bundle), preload=True))) as c:
        assert "(--preload)" in caplog.text and "interrogation tags" in caplog.text
        assert c.get("/healthz").status_code == 200


# -- a real server on loopback ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    app = create_app(settings(tmp_path_factory.mktemp("srv"), max_wait_ms=30, max_batch=64), model=model)
    with serve_app(app) as url:
        yield url, app


def test_unmodified_a1111_client_gets_a_caption(server, images) -> None:
    import requests

    url, _ = server
    b64_image = base64.b64encode(images[0]).decode("utf-8")
    response = requests.post(url + "/sdapi/v1/interrogate", json={"image": b64_image, "model": "clip"})
    assert response.status_code == 200
    assert isinstance(response.json()["caption"], str) and response.json()["caption"]


def test_concurrent_requests_each_get_their_own_embedding(server, model) -> None:
    import requests

    url, app = server
    n = 24
    pngs = [noise_png(i) for i in range(n)]
    texts = [f"photo number {i} of {'a dog' if i % 2 else 'a cat'}" for i in range(n)]
    want_img = model.encode_images(pngs)
    want_txt = model.encode_texts(texts)
    barrier = threading.Barrier(n)

    def call(i: int) -> tuple[int, np.ndarray]:
        body = {"images": [b64(pngs[i])]} if i % 2 else {"texts": [texts[i]]}
        barrier.wait(10)
        r = requests.post(url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return i, np.array(r.json()["data"][0]["embedding"], np.float32)

    before = app.state.clip.batcher.stats.max_batch_seen
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(call, range(n)))
    for i, got in results:
        want = want_img if i % 2 else want_txt
        # Its own row, and nearer to it than to any other request's.
        np.testing.assert_allclose(got, want[i], atol=1e-4)
        assert int(np.argmax(want @ got)) == i
    assert max(before, app.state.clip.batcher.stats.max_batch_seen) > 1, "requests were never batched together"
