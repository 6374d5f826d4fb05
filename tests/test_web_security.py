"""Both web apps (``clipworks serve`` with its gallery, and the ``stream --web`` page) behind ``clipworks.webguard``,
over real uvicorn servers on loopback: rebinding Host names, cross-site POSTs, content types, oversized and
streamed bodies, non-strict JSON on every JSON route, the API key by header, login cookie, env and file, and a
model that fails to load in ``serve`` (the real CLI in a subprocess)."""

from __future__ import annotations

import base64
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest

from clipworks.cli.main import main
from clipworks.library import Library
from clipworks.service import ServiceSettings, create_app, gallery
from conftest import free_port, serve_app
from library_helpers import file_ids
from memory_helpers import peak_growth_mb

KEY = "s3cret-Key_42"
SERVE_LIMIT = 1 << 20  # the serve app's body limit in these tests (the stream page's is MAX_BODY_BYTES)


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def library(model, photos, tmp_path_factory) -> Iterator[Library]:
    root = tmp_path_factory.mktemp("websec") / "photos"
    root.mkdir()
    for p in photos[:4]:
        shutil.copy(p, root / p.name)
    lib = Library(root.parent / "lib.db", model, create=True)
    lib.index([root], batch_size=8)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def image_b64(photos) -> str:
    return base64.b64encode(photos[0].read_bytes()).decode()


def _serve(model, library, tmp: Path, **kw) -> Iterator[str]:
    settings = ServiceSettings(tags=["dog", "cat"], tags_cache_dir=tmp / "tags", max_body_bytes=SERVE_LIMIT, **kw)
    with serve_app(create_app(settings, model=model, library=library, routers=[gallery.router])) as url:
        yield url


@pytest.fixture(scope="module")
def serve_url(model, library, tmp_path_factory) -> Iterator[str]:
    yield from _serve(model, library, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def keyed_serve_url(model, library, tmp_path_factory) -> Iterator[str]:
    yield from _serve(model, library, tmp_path_factory.mktemp("keyed"), api_key=KEY)


def _stream(model, tmp: Path, **kw) -> Iterator[SimpleNamespace]:
    """The real stream app and page; a small thread stands in for the processing loop, which applies the page's
    edits between frames (no video is decoded: these tests are about the web layer)."""
    from clipworks.prompts import PromptSet, encode_entries
    from clipworks.stream.app import StreamApp, StreamOptions
    from clipworks.stream.prompts import PromptState
    from clipworks.stream.web import WebServer

    path = tmp / "embeddings.json"
    ps = PromptSet.from_texts(["a street", "a car"])
    encode_entries(ps, model.encode_texts)
    ps.save(path)
    prompts = PromptState.open(path, model.encode_texts)
    app = StreamApp(model, prompts, [], StreamOptions(keep_alive=True))
    server = WebServer(app, "127.0.0.1", 0, **kw).start()
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            prompts.apply_pending()
            time.sleep(0.01)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    yield SimpleNamespace(url=server.url, path=path, prompts=prompts)
    stop.set()
    thread.join(5)
    server.stop()


@pytest.fixture(scope="module")
def stream(model, tmp_path_factory) -> Iterator[SimpleNamespace]:
    yield from _stream(model, tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def keyed_stream(model, tmp_path_factory) -> Iterator[SimpleNamespace]:
    yield from _stream(model, tmp_path_factory.mktemp("kstream"), api_key=KEY)


@pytest.fixture
def apps(serve_url, stream) -> dict[str, str]:
    return {"serve": serve_url, "stream": stream.url}


def _host(url: str) -> str:
    return urlsplit(url).netloc


# -- Host names (DNS rebinding) -------------------------------------------------------------------

REBOUND = ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "LOCALHOST.evil."]
LOCAL = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "photos-box", "cam.localhost"]


@pytest.mark.parametrize(("app", "path"), [("serve", "/api/library"), ("serve", "/healthz"), ("serve", "/"),
                                           ("stream", "/api/state"), ("stream", "/")])  # fmt: skip
def test_rebinding_host_names_are_refused_ip_addresses_and_local_names_answered(apps, app, path) -> None:
    url = apps[app]
    for host in REBOUND:
        r = httpx.get(url + path, headers={"Host": host})
        assert r.status_code == 403, (host, r.text)
        assert "host name" in r.text and host.lower() not in r.text.lower()  # nothing echoed to the rebinding page
        assert "threshold" not in r.text and "photos" not in r.text
    for host in LOCAL:
        assert httpx.get(url + path, headers={"Host": host.format(port=urlsplit(url).port)}).status_code == 200, host


def test_an_allowed_host_is_answered(model, library, tmp_path) -> None:
    for url in _serve(model, library, tmp_path, allowed_hosts=("photos.example.org",)):
        assert httpx.get(url + "/api/library", headers={"Host": "photos.example.org:8000"}).status_code == 200
        assert httpx.get(url + "/api/library", headers={"Host": "evil.example"}).status_code == 403


# -- cross-site requests --------------------------------------------------------------------------

CROSS_ORIGINS = ["http://evil.example", "null", "http://127.0.0.1:1", "https://evil.example:443", "file://"]
STATE_CHANGES = [
    ("serve", "/v1/embeddings", {"json": {"texts": ["a dog"]}}),
    ("serve", "/sdapi/v1/interrogate", {"json": {"image": "{image}"}}),
    ("serve", "/api/search?id=1", {}),
    ("stream", "/api/save", {}),
    ("stream", "/api/load", {}),
    ("stream", "/api/prompts", {"json": {"threshold": 0.05}}),
]


@pytest.mark.parametrize(("app", "path", "kw"), STATE_CHANGES, ids=[p for _, p, _ in STATE_CHANGES])
def test_cross_site_posts_are_refused_and_change_nothing(apps, stream, image_b64, app, path, kw) -> None:
    url = apps[app]
    if "json" in kw and kw["json"].get("image") == "{image}":
        kw = {"json": {"image": image_b64}}
    before = (stream.path.read_bytes(), stream.prompts.version)
    for origin in CROSS_ORIGINS:
        r = httpx.post(url + path, headers={"Origin": origin}, **kw)
        assert r.status_code == 403, (origin, r.text)
        assert "cross-site request refused" in r.text
    assert (stream.path.read_bytes(), stream.prompts.version) == before
    # The page itself (its own origin) and clients that send no Origin (scripts, curl) are served.
    for headers in ({"Origin": url}, {}):
        r = httpx.post(url + path, headers=headers, timeout=30, **kw)
        assert r.status_code == 200, (headers, r.text)


JSON_ONLY = [("serve", "/v1/rank"), ("serve", "/sdapi/v1/interrogate"), ("stream", "/api/prompts"),
             ("stream", "/api/save")]  # fmt: skip
UPLOADS = [("serve", "/v1/embeddings", "images"), ("serve", "/api/search", "image")]
UNDECLARED = [
    ("text/plain", b'{"texts": ["a dog"]}'),  # what a cross-site form or no-cors fetch sends without a preflight
    ("application/x-www-form-urlencoded", b'{"texts": ["a dog"]}'),
    (None, b'{"texts": ["a dog"]}'),  # a Blob body: no Content-Type at all, which FastAPI parses as JSON
    ("application/x-www-form-urlencoded", b""),  # an empty cross-site form
    ("text/html", b"<p>"),
]


@pytest.mark.parametrize("route", JSON_ONLY + UPLOADS, ids=[r[1] for r in JSON_ONLY + UPLOADS])
def test_bodies_must_be_declared_json_or_an_upload(apps, stream, image_b64, photos, route) -> None:
    url = apps[route[0]] + route[1]
    before = stream.path.read_bytes()
    for content_type, body in UNDECLARED:
        r = httpx.post(url, content=body, headers={"Content-Type": content_type} if content_type else {})
        assert r.status_code == 415, (content_type, r.text)
        assert "application/json" in r.json()["error" if route[0] == "stream" else "detail"]
    assert stream.path.read_bytes() == before
    if len(route) == 3:  # the routes that take uploads still do
        upload = {route[2]: ("a.jpg", photos[0].read_bytes(), "image/jpeg")}
        assert httpx.post(url, files=upload, timeout=30).status_code == 200
    else:
        good = {"/v1/rank": {"image": image_b64, "texts": ["a dog"]}, "/sdapi/v1/interrogate": {"image": image_b64},
                "/api/prompts": {"threshold": 0.4}, "/api/save": None}[route[1]]  # fmt: skip
        assert httpx.post(url, json=good, timeout=30).status_code == 200


# -- oversized bodies -----------------------------------------------------------------------------


def _post_stream(url: str, path: str, content_type: str, total: int, prefix: bytes = b"", chunked: bool = True):
    """POST up to ``total`` bytes as a client streaming a huge body would; stop when the server answers.

    Returns the status line and how many body bytes the server let through before answering."""
    parts = urlsplit(url)
    chunk = 64 * 1024
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
        sock.sendall(head.encode())
        sent = 0
        first = prefix + b"a" * (chunk - len(prefix))
        while sent < total and not select.select([sock], [], [], 0)[0]:
            data = first if sent == 0 else b"a" * chunk
            try:
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            except OSError:  # the server closed the connection: it will not read the rest
                break
            sent += len(data)
        answer = sock.recv(65536).decode("latin-1")
    return answer.partition("\r\n")[0], sent


MULTIPART = b'--x\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n\r\n'


@pytest.mark.parametrize("chunked", [True, False], ids=["streamed", "content-length"])
@pytest.mark.parametrize(
    ("app", "path", "content_type", "prefix"),
    [
        ("serve", "/v1/embeddings", "application/json", b'{"texts": ["'),
        ("serve", "/v1/embeddings", "multipart/form-data; boundary=x", MULTIPART),
        ("serve", "/api/search", "multipart/form-data; boundary=x", MULTIPART.replace(b"images", b"image")),
        ("stream", "/api/prompts", "application/json", b'{"index": 0, "text": "'),
        ("stream", "/api/save", "application/json", b'{"x": "'),
    ],
)
def test_oversized_bodies_are_refused_early_with_bounded_memory(apps, app, path, content_type, prefix, chunked):
    from clipworks.stream.web import MAX_BODY_BYTES

    limit = SERVE_LIMIT if app == "serve" else MAX_BODY_BYTES
    # The servers run in this process: its peak RSS (the kernel's high-water mark) bounds theirs.
    with peak_growth_mb() as growth:
        status, sent = _post_stream(apps[app], path, content_type, 300 << 20, prefix, chunked)
    assert status.startswith("HTTP/1.1 413"), status
    # Refused once the limit passed (what sits in socket buffers aside), not after reading 300 MB.
    assert sent < limit + (16 << 20), f"the server read {sent} bytes before refusing"
    assert growth() < 64, f"RSS grew by {growth():.0f} MB"


# -- strict JSON ----------------------------------------------------------------------------------

BAD_JSON = {
    "NaN": (b'{"texts": [NaN], "threshold": NaN}', "NaN"),
    "Infinity": (b'{"top_k": Infinity, "threshold": Infinity}', "Infinity"),
    "-Infinity": (b'{"k": -Infinity, "threshold": -Infinity}', "-Infinity"),
    "overflow": (b'{"top_k": 1e999, "threshold": 1e999}', "beyond the range"),
    "invalid UTF-8": (b'{"texts": ["\xff\xfe"], "text": "\xff"}', "not valid UTF-8"),
    "overlong UTF-8": (b'{"texts": ["\xc0\xaf"]}', "not valid UTF-8"),
    "encoded surrogate": (b'{"texts": ["\xed\xa0\x80"]}', "not valid UTF-8"),
    "lone surrogate": (b'{"texts": ["\\ud800"], "image": "\\udfff", "index": 0, "text": "\\ud800"}', "surrogate"),
    "surrogate key": (b'{"\\udbff": 1}', "surrogate"),
    "unpaired high": (b'{"labels": ["\\ud83d x"], "q": "\\ud83d"}', "surrogate"),
    "long integer": (b'{"k": ' + b"9" * 5000 + b"}", "too long"),
    "deep nesting": (b'{"texts": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
}
JSON_ROUTES = [("serve", p) for p in ("/sdapi/v1/interrogate", "/sdapi/v1/interrogate/structured", "/v1/embeddings",
                                      "/v1/classify", "/v1/rank", "/api/search")]  # fmt: skip
JSON_ROUTES += [("stream", p) for p in ("/api/prompts", "/api/save", "/api/load")]


@pytest.mark.parametrize("bad", list(BAD_JSON))
def test_non_strict_json_gets_400_with_the_reason_on_every_json_route(apps, stream, bad) -> None:
    body, reason = BAD_JSON[bad]
    before = stream.path.read_bytes()
    for app, path in JSON_ROUTES:
        r = httpx.post(apps[app] + path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text)
        answer = r.json()
        if path.startswith("/sdapi/"):  # Automatic1111's error shape on its routes
            assert answer["error"] == "HTTPException" and answer["errors"] == ""
        detail = answer["error"] if app == "stream" else answer["detail"]
        assert reason in detail, (path, detail)
    assert stream.path.read_bytes() == before
    assert httpx.post(apps["serve"] + "/v1/embeddings", json={"texts": ["a"]}).status_code == 200  # still serving


# -- the API key ----------------------------------------------------------------------------------


@pytest.fixture
def keyed(keyed_serve_url, keyed_stream, library) -> dict[str, list[str]]:
    file_id = next(iter(file_ids(library.path).values()))
    return {
        keyed_serve_url: ["/", "/api/library", "/api/search?q=dog", f"/thumb/{file_id}", "/metrics", "/docs"],
        keyed_stream.url: ["/", "/api/state"],
    }


def test_the_key_by_header_or_by_the_login_cookie(keyed, keyed_serve_url) -> None:
    assert httpx.get(keyed_serve_url + "/healthz").status_code == 200  # open, for health checks
    for url, paths in keyed.items():
        with httpx.Client(base_url=url) as browser:
            for path in paths:
                r = browser.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
                assert browser.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
                assert browser.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
            # A page load without the key gets the login form, which posts back here.
            page = browser.get("/api/library?x=1", headers={"Accept": "text/html"})
            assert page.status_code == 401 and 'action="/login"' in page.text
            assert 'value="/api/library?x=1"' in page.text
            r = browser.post("/login", data={"key": "wrong", "next": "/"})
            assert r.status_code == 401 and "not this server" in r.text and not r.cookies
            r = browser.post("/login", data={"key": KEY, "next": paths[-1]})
            assert r.status_code == 303 and r.headers["location"] == paths[-1]
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
            for path in paths:
                assert browser.get(path).status_code == 200, path  # the cookie alone
            assert browser.post("/login", headers={"Origin": "http://evil.example"},
                                data={"key": KEY}).status_code == 403  # fmt: skip


@pytest.mark.parametrize("target", ["//evil.example/", "http://evil.example/", "/\\evil.example", "evil"])
def test_login_never_sends_the_browser_to_another_site(keyed_serve_url, target) -> None:
    r = httpx.post(keyed_serve_url + "/login", data={"key": KEY, "next": target})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_a_cookie_of_another_key_or_a_forged_one_is_refused(keyed_serve_url, model, library, tmp_path) -> None:
    r = httpx.post(keyed_serve_url + "/login", data={"key": KEY})
    name, value = r.headers["set-cookie"].split(";")[0].split("=")

    def library_with(cookie: str, url: str = keyed_serve_url) -> int:
        return httpx.get(url + "/api/library", headers={"Cookie": cookie}).status_code

    assert library_with(f"{name}={value}") == 200
    for other in _serve(model, library, tmp_path, api_key="another-key"):
        assert library_with(f"{name}={value}", other) == 401
        other_name = httpx.post(other + "/login", data={"key": "another-key"}).headers["set-cookie"].split("=")[0]
        assert other_name != name  # two servers on one host keep separate logins (cookies ignore ports)
    forged = value[:-1] + ("1" if value.endswith("0") else "0")
    for cookie in (f"{name}={forged}", f"{name}={KEY}", f"{name}=", f"other={value}"):
        assert library_with(cookie) == 401, cookie


# -- the key from the environment or a file, and serve's start-up ---------------------------------


def _cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real CLI in a subprocess (the clipworks these tests import), its cache (tag embeddings) under ``home``."""
    import clipworks

    src = str(Path(clipworks.__file__).resolve().parents[1])
    full = {**os.environ, "PYTHONPATH": src, "CLIPWORKS_HOME": str(home), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "clipworks.cli.main", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _listening(proc: subprocess.Popen, url: str) -> httpx.Response:
    """The first answer of ``/healthz`` from a CLI server starting in ``proc``."""
    deadline = time.monotonic() + 90
    while True:
        try:
            return httpx.get(url + "/healthz", timeout=1)
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)


def test_serve_takes_the_key_from_a_file_out_of_ps(vit_bundle, tmp_path) -> None:
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    args = ["serve", "--model", str(vit_bundle), "--host", "127.0.0.1", "--port", str(port)]
    proc = _cli(*args, "--api-key-file", str(key_file), home=tmp_path, env={"CLIPWORKS_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        health = _listening(proc, url)
        assert health.status_code == 503 and "loads on the first request" in health.json()["reason"]
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()  # what `ps` shows
        assert httpx.get(url + "/api/library").status_code == 401
        r = httpx.post(url + "/v1/embeddings", json={"texts": ["a"]}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_serve_takes_the_key_from_the_environment_and_allowed_hosts(vit_bundle, monkeypatch) -> None:
    import uvicorn

    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("CLIPWORKS_API_KEY", KEY)
    assert main(["serve", "--model", str(vit_bundle), "--allowed-host", "photos.example.org"]) == 0
    assert served["host"] == "0.0.0.0"  # with a key it listens beyond loopback
    with serve_app(served["app"]) as url:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={**auth, "Host": "photos.example.org"}).status_code == 200
        assert httpx.get(url + "/metrics", headers={**auth, "Host": "evil.example"}).status_code == 403


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", "a", "--api-key-file", "{tmp}/key"], "not both"),
        (["--api-key-file", "{tmp}/missing"], "missing"),
        (["--api-key-file", "{tmp}/empty"], "empty"),
        (["--api-key", "two words"], "spaces"),
        (["--api-key", "clé"], "non-ASCII"),
        (["--allowed-host", "http://x.org/"], "no URL"),
    ],
)
def test_bad_key_options_fail_in_one_line(tmp_path, capsys, monkeypatch, args, message) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("serve started with a bad key option"))
    (tmp_path / "key").write_text("k")
    (tmp_path / "empty").write_text("\n \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def _broken_bundle(vit_bundle: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken-model"
    shutil.copytree(vit_bundle, broken)
    graph = broken / "visual" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])  # a half-copied file
    return broken


@pytest.mark.parametrize("case", ["broken graph, --preload", "missing model"])
def test_serve_with_a_model_that_cannot_load_stops_in_one_line(vit_bundle, tmp_path, case) -> None:
    model = _broken_bundle(vit_bundle, tmp_path) if "broken" in case else tmp_path / "no-such-model"
    args = ["serve", "--model", str(model), "--port", str(free_port())]
    proc = _cli(*args, *(["--preload"] if "--preload" in case else []), home=tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"serve kept running with a model that cannot load: {err[-500:]}")
    lines = [line for line in err.splitlines() if not line.startswith("INFO:")]  # "loading model ..." is fine
    assert proc.returncode != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(model) in lines[0], err
    assert "Traceback" not in err and "serving" not in err and not out


def test_a_model_that_fails_to_load_on_first_use_answers_503_with_the_reason(vit_bundle, tmp_path, image_b64):
    broken = _broken_bundle(vit_bundle, tmp_path)
    settings = ServiceSettings(model=str(broken), tags=["dog"], tags_cache_dir=tmp_path / "tags")
    with serve_app(create_app(settings)) as url:
        r = httpx.get(url + "/healthz")
        assert r.status_code == 503 and r.json()["status"] == "not ready" and "not loaded yet" in r.json()["reason"]
        for path, body in [("/v1/embeddings", {"texts": ["a"]}), ("/sdapi/v1/interrogate", {"image": image_b64})]:
            r = httpx.post(url + path, json=body)
            assert r.status_code == 503, r.text
            detail = r.json()["detail"]
            assert "could not be loaded" in detail and "model.onnx" in detail
        r = httpx.get(url + "/healthz")
        assert r.status_code == 503 and "model.onnx" in r.json()["reason"]
        # Fixed on disk, the model serves on the next request without a restart.
        shutil.copy(vit_bundle / "visual" / "model.onnx", broken / "visual" / "model.onnx")
        assert httpx.post(url + "/v1/embeddings", json={"texts": ["a"]}).status_code == 200
        assert httpx.get(url + "/healthz").status_code == 200


def test_a_good_model_with_preload_is_ready_before_serving(vit_bundle, tmp_path) -> None:
    port = free_port()
    (tmp_path / "tags.txt").write_text("dog\ncat\nbuilding\n")
    args = [
        "serve",
        "--model",
        str(vit_bundle),
        "--port",
        str(port),
        "--preload",
        "--tags-file",
        str(tmp_path / "tags.txt"),
    ]
    proc = _cli(*args, home=tmp_path)
    try:
        health = _listening(proc, f"http://127.0.0.1:{port}")
        assert health.status_code == 200 and health.json()["loaded"] is True
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert err.index("interrogation tags") < err.index("clipworks serving")  # loaded before it says so


# -- the pages in a real browser ------------------------------------------------------------------


def test_gallery_with_a_key_in_headless_chromium(keyed_serve_url, library, tmp_path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from browser_helpers import browser

    driver = browser(tmp_path / "chrome-profile")
    try:
        # The page renders its messages and tiles anew: an element found may be replaced before it is read.
        wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(keyed_serve_url + "/?q=a+dog")
        box = wait.until(lambda d: d.find_element(By.ID, "key"))
        box.send_keys("wrong", Keys.ENTER)
        wait.until(lambda d: "not this server" in d.find_element(By.ID, "error").text)
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .tile")) > 0)
        assert driver.current_url == keyed_serve_url + "/?q=a+dog"  # back where the login started
        ids = {path: i for i, path in library.store.paths_of(library.vectors().ids).items()}
        want = [ids[h.path] for h in library.search("a dog", top_k=60)]  # the page's first page holds 60
        shown = [int(t.get_attribute("data-id")) for t in driver.find_elements(By.CSS_SELECTOR, "#results .tile")]
        assert shown == want
        # Thumbnails are <img> loads: they carry the cookie, as no header could.
        loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda d: d.execute_script(loaded))
        # A search by photo is a POST from the page: same origin, so the guard lets it through.
        driver.execute_script("document.querySelectorAll('#results .tile .similar')[1].click()")
        wait.until(lambda d: d.find_element(By.ID, "title").text == "Similar photos")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .tile"))
        first = driver.find_element(By.CSS_SELECTOR, "#results .tile").get_attribute("data-score")
        assert float(first) == pytest.approx(1.0, abs=1e-4)  # the example itself: the POST was answered
        cookies = driver.get_cookies()
        assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
        assert driver.execute_script("return document.cookie") == ""  # scripts cannot read it
    finally:
        driver.quit()
