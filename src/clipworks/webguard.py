"""What keeps the two web servers safe to run (``clipworks serve`` and ``clipworks stream --web``): one ASGI
middleware, ``WebGuard``, in front of both apps.

Both listen on a loopback or LAN address and are driven from a browser, so a page on another site that the
operator happens to have open must not be able to use them. In the order the checks run:

- **Host allow-list.** A DNS-rebinding page reaches the server under its own domain name; only IP literals
  (rebinding needs a name), names without a dot (no one can register one on the internet: ``localhost``,
  a LAN machine's name), ``*.localhost``, this machine's ``NAME.local`` and the hosts the operator allows
  are answered (403 otherwise).
- **Origin check.** Browsers send ``Origin`` with every state-changing request (POST, PUT, PATCH, DELETE);
  anything but this server's own origin is refused (403), ``Origin: null`` (sandboxed frames, files) too.
- **API key.** ``Authorization: Bearer KEY``; a browser, which cannot add that header to a page load or an
  ``<img>``, logs in once through a small form and then sends an HttpOnly, SameSite=Strict cookie. Both are
  compared in constant time. Unauthenticated page loads get the form, API calls a 401.
- **Content type.** A request body must be JSON (``application/json``) or a multipart upload: the types a
  cross-site form or a no-cors ``fetch`` can send without a CORS preflight (text/plain, urlencoded forms, or
  no type at all, which FastAPI would parse as JSON) are refused (415).
- **Body size.** Over the limit is refused by Content-Length before reading, or as soon as a streamed body
  passes it (413): memory stays bounded whatever the client sends.
- **Strict JSON.** NaN, Infinity, numbers beyond float range, invalid UTF-8 and lone surrogates are refused
  (400) before any route sees them: Python's json module accepts the first two and the surrogates, and the
  app would then fail to even render its answer (a bare 500).

Refusals are JSON in the app's own error shape (``GuardPolicy.error_body``).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import math
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from clipworks.errors import UsageError

ASGIApp = Any
ErrorBody = Callable[[str, int, Any], dict[str, Any]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATH = "/login"
MAX_LOGIN_BYTES = 4096
# Any printable ASCII but space: what an HTTP header (and a password box) carries unchanged.
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def detail_body(path: str, status: int, detail: Any) -> dict[str, Any]:
    """FastAPI's error shape, ``{"detail": ...}``."""
    return {"detail": detail}


@dataclass(frozen=True)
class GuardPolicy:
    """What one server accepts.

    ``allowed_hosts``: host names answered besides IP literals, dotless and localhost names and this machine's
    (give the bound host; ``"*"`` answers any, for a proxy that checks Host itself). ``open_paths``: reachable
    without the key (health checks).
    """

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    open_paths: frozenset[str] = frozenset()
    error_body: ErrorBody = detail_body

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_key(self.api_key, "the API key")

    @cached_property
    def host_names(self) -> frozenset[str]:
        machine = socket.gethostname().lower()  # no getfqdn(): a reverse DNS look-up can take seconds
        names = {machine, f"{machine.partition('.')[0]}.local", *(_host_name(h) for h in self.allowed_hosts)}
        return frozenset(n for n in names if n)

    def host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        if "*" in self.allowed_hosts or name in self.host_names or "." not in name or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    @cached_property
    def session(self) -> tuple[str, str]:
        """The login cookie's name and value, both derived from the key (the cookie never holds the key itself).

        The name differs per key because cookies ignore ports: the gallery and a stream page on one host,
        each with its own key, would otherwise overwrite each other's login.
        """
        assert self.api_key is not None
        token = hmac.new(self.api_key.encode(), b"clipworks browser session", hashlib.sha256).hexdigest()
        return f"clipworks_{hashlib.sha256(token.encode()).hexdigest()[:12]}", token


def check_key(key: str, source: str) -> str:
    """Refuse a key that an HTTP header cannot carry as typed (spaces, control or non-ASCII characters)."""
    if not KEY_PATTERN.fullmatch(key):
        raise UsageError(
            f"{source} is empty or has spaces, control or non-ASCII characters, which HTTP headers do not carry "
            "as typed: use letters, digits and punctuation"
        )
    return key


def read_key_file(path: Path) -> str:
    """The API key on the first line of ``path`` (surrounding whitespace and the newline dropped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the API key from {path}: {reason}") from e
    lines = text.strip().splitlines()
    return check_key(lines[0].strip() if lines else "", f"the API key in {path}")


# -- strict JSON ---------------------------------------------------------------------------------------


class _NotJson(ValueError):
    """A value Python's json module would accept but JSON (RFC 8259) does not have."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"the request body has {name}, which JSON does not allow; send a number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the request body has the number {text[:40]}, beyond the range of a double")
    return value


def json_problem(body: bytes) -> str | None:
    """Why ``body`` is not strict JSON, or None: also None for plain syntax errors, which the app's own parser
    reports in its own shape (FastAPI's 422)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not valid UTF-8 (byte {e.start}); JSON must be UTF-8"
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotJson as e:
        return str(e)
    except json.JSONDecodeError:
        return None
    except ValueError as e:  # an integer too long to convert
        return f"the request body has a number too long to read ({e})"
    except RecursionError:
        return "the request body is nested too deeply"
    if not SURROGATE_ESCAPE.search(body):
        return None  # strict UTF-8 has no surrogates: only a \uD8xx-style escape can make one
    stack = [value]
    while stack:  # a loop, not recursion: the depth is the client's
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "the request body has a string with a lone surrogate (a \\ud800-\\udfff escape without its pair)"
    return None


# -- the middleware ------------------------------------------------------------------------------------


class WebGuard:
    """The checks described in the module docstring, in front of ``app``."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        path, method = scope["path"], scope["method"]
        headers = _headers(scope)
        host = headers.get("host", "")
        if host and not policy.host_allowed(host):
            # The name is not echoed: the page that sent it may be reading the answer.
            refusal = "this server does not answer to that host name; the operator can allow it as an allowed host"
            await self._refuse(send, path, 403, refusal)
            return
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and not same_origin(origin, host):
            await self._refuse(send, path, 403, f"cross-site request refused (Origin: {origin[:100]})")
            return
        if policy.api_key is not None:
            if path == LOGIN_PATH:
                await self._login(scope, receive, send, headers)
                return
            if path not in policy.open_paths and not self._authorized(scope):
                await self._unauthorized(scope, send, headers)
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_body_bytes:
            await self._refuse(send, path, 413, too_large(policy.max_body_bytes))
            return
        if method not in SAFE_METHODS:
            kind = media_type(headers.get("content-type", ""))
            has_body = (length.isdigit() and int(length) > 0) or "transfer-encoding" in headers
            if kind == "json":
                body = await _read_body(receive, policy.max_body_bytes)
                if body is None:
                    await self._refuse(send, path, 413, too_large(policy.max_body_bytes))
                    return
                problem = json_problem(body)
                if problem is not None:
                    await self._refuse(send, path, 400, problem)
                    return
                receive = _replay(body, receive)
            elif kind != "multipart" and (kind or has_body):
                given = headers.get("content-type", "none")[:60]
                wanted = f"send the body as JSON with 'Content-Type: application/json' (or multipart), not {given!r}"
                await self._refuse(send, path, 415, wanted)
                return
        await self.app(scope, _limited(receive, policy.max_body_bytes), send)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        assert self.policy.api_key is not None
        expected = f"Bearer {self.policy.api_key}".encode()
        name, token = self.policy.session
        ok = False
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                ok |= hmac.compare_digest(value, expected)
            elif key == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    cookie, _, given = part.strip().partition("=")
                    if cookie == name:
                        ok |= hmac.compare_digest(given.encode("latin-1"), token.encode())
        return ok

    async def _unauthorized(self, scope: dict[str, Any], send: Any, headers: dict[str, str]) -> None:
        if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
            query = scope["query_string"].decode("latin-1")
            here = safe_next(scope["path"] + (f"?{query}" if query else ""))
            await _send(send, 401, login_page(here), "text/html; charset=utf-8", [(b"cache-control", b"no-store")])
            return
        detail = f"missing or wrong API key: send 'Authorization: Bearer KEY' (a browser: log in at {LOGIN_PATH})"
        await self._refuse(send, scope["path"], 401, detail, [(b"www-authenticate", b"Bearer")])

    async def _login(self, scope: dict[str, Any], receive: Any, send: Any, headers: dict[str, str]) -> None:
        """``GET /login``: the form; ``POST /login`` (``key``, ``next``): the cookie and back to ``next``."""
        query = parse_qs(scope["query_string"].decode("latin-1"))
        if scope["method"] != "POST":
            page = login_page(safe_next(query.get("next", ["/"])[0]))
            await _send(send, 200, page, "text/html; charset=utf-8", [(b"cache-control", b"no-store")])
            return
        body = await _read_body(receive, MAX_LOGIN_BYTES)
        if body is None or media_type(headers.get("content-type", "")) != "form":
            detail = "post the login form (key=...) as application/x-www-form-urlencoded"
            await self._refuse(send, scope["path"], 400, detail)
            return
        form = parse_qs(body.decode("utf-8", "replace"))
        given = form.get("key", [""])[0].strip()
        target = safe_next(form.get("next", ["/"])[0])
        assert self.policy.api_key is not None
        if not hmac.compare_digest(given.encode(), self.policy.api_key.encode()):
            page = login_page(target, "That is not this server's API key.")
            await _send(send, 401, page, "text/html; charset=utf-8", [(b"cache-control", b"no-store")])
            return
        name, token = self.policy.session
        cookie = f"{name}={token}; Path=/; HttpOnly; SameSite=Strict"
        await _send(send, 303, b"", "text/plain", [(b"location", target.encode()), (b"set-cookie", cookie.encode())])

    async def _refuse(
        self, send: Any, path: str, status: int, detail: str, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        body = json.dumps(self.policy.error_body(path, status, detail)).encode()
        await _send(send, status, body, "application/json", extra)


def too_large(max_bytes: int) -> str:
    return f"request body is over the limit of {max_bytes} bytes"


def media_type(content_type: str) -> str:
    """``json``, ``multipart``, ``form`` (urlencoded), another type as given, or '' for none."""
    kind = content_type.partition(";")[0].strip().lower()
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return "json"
    if kind == "multipart/form-data":
        return "multipart"
    if kind == "application/x-www-form-urlencoded":
        return "form"
    return kind


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names the server the request was sent to (its ``Host``).

    The scheme is not compared: behind a TLS proxy the page is https and the hop to us is not.
    """
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        return False  # "null" included
    default = ":443" if parts.scheme == "https" else ":80"
    return parts.netloc.lower().removesuffix(default) == host.lower().removesuffix(default)


def safe_next(target: str) -> str:
    """Where the login form may send the browser back to: a path on this server, never another site."""
    if not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipworks: log in</title>
<style>
  body {{ margin: 0; min-height: 90vh; display: grid; place-items: center; font: 15px/1.4 system-ui, sans-serif; }}
  form {{ display: grid; gap: 10px; width: min(340px, 90vw); }}
  h1 {{ font-size: 18px; margin: 0; }}
  input, button {{ padding: 9px 12px; font-size: 15px; border-radius: 8px; border: 1px solid #bbb; }}
  button {{ background: #2f5fd0; border-color: #2f5fd0; color: #fff; cursor: pointer; }}
  .error {{ color: #b3261e; min-height: 1.4em; margin: 0; }}
</style></head>
<body><form method="post" action="{login}">
  <h1>clipworks</h1>
  <label for="key">This server needs its API key.</label>
  <input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
  <input type="hidden" name="next" value="{next}">
  <button id="login" type="submit">Log in</button>
  <p id="error" class="error">{message}</p>
</form></body></html>
"""


def login_page(next_path: str, message: str = "") -> bytes:
    page = LOGIN_PAGE.format(login=LOGIN_PATH, next=html.escape(next_path), message=html.escape(message))
    return page.encode()


# -- ASGI plumbing -------------------------------------------------------------------------------------


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The first value of each header, by lower-case name (ASGI servers give names in lower case)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return out


def _host_name(host: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    return (name if sep and port.isdigit() and ":" not in name else host).rstrip(".")


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` (the rest is never read)."""
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(chunks)  # the client went away; the app sees what came
        chunks += message.get("body", b"")
        if len(chunks) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()  # only http.disconnect is left
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _limited(receive: Any, limit: int) -> Any:
    """Counts a body the app streams itself (multipart uploads) and stops it at ``limit``."""
    seen = 0

    async def limited() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Raised inside the app's read: Starlette answers its HTTPException with the app's error shape.
                from starlette.exceptions import HTTPException

                raise HTTPException(413, too_large(limit))
        return message

    return limited


async def _send(
    send: Any, status: int, body: bytes, content_type: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
