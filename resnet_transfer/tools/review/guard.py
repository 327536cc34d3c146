"""The review server's front door, as a local notebook server keeps it (an ASGI middleware, no framework).

Every request must:

- carry a ``Host`` header naming the address the server is bound to (``127.0.0.1:PORT``, ``localhost:PORT``;
  for a ``--host`` bind, that host): a page of another site whose name was pointed at 127.0.0.1 (DNS
  rebinding) is refused (403);
- carry the token: ``?token=...`` (the printed URL; the answer sets an HttpOnly, SameSite=Strict cookie and
  the page's address loses the token), or that cookie; else 403;
- for anything but GET/HEAD, also carry the token in the ``X-RT-Token`` header (a cookie alone is what a
  cross-site form would send), and an ``Origin``, if any, of an allowed host; else 403;
- not hide separators in percent escapes (``%2F``, ``%5C``, ``%00`` in the raw path): 404.

Every answer gets headers that keep the page to itself: a content security policy allowing only this
server's scripts, styles and images, no framing, no sniffing, no referrer.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

TOKEN_HEADER = b"x-rt-token"
SAFE_METHODS = {"GET", "HEAD"}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
BAD_ESCAPES = (b"%2f", b"%5c", b"%00")
REFUSED = (
    "<!doctype html><meta charset=utf-8><title>rt review</title>"
    "<p>This review needs its token: open the address <code>rt review</code> printed "
    "(<code>http://127.0.0.1:PORT/?token=...</code>).</p>"
)


class Guard:
    """Wrap ``app``: refuse requests without ``token`` or with a ``Host`` not in ``hosts``."""

    def __init__(self, app: ASGI, token: str, hosts: Iterable[str], cookie: str = "rt_review") -> None:
        self.app = app
        self.token = token.encode()
        self.hosts = {h.lower().encode() for h in hosts}
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            return
        headers = _headers(scope)
        method = scope.get("method", "GET")
        if headers.get(b"host", b"").lower() not in self.hosts:
            await _plain(send, 403, "Host not allowed: open the address rt review printed")
            return
        raw = (scope.get("raw_path") or scope.get("path", "").encode()).lower()
        if any(e in raw for e in BAD_ESCAPES):
            await _plain(send, 404, "not found")
            return
        query_token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[-1].encode()
        cookie_token = _cookie(headers, self.cookie).encode()
        by_query = self._ok(query_token)
        if not (by_query or self._ok(cookie_token)):
            await _html(send, 403, REFUSED)
            return
        if method not in SAFE_METHODS:
            origin = headers.get(b"origin")
            origin_ok = origin is None or origin.lower().split(b"://", 1)[-1] in self.hosts
            if not (self._ok(headers.get(b"x-rt-token", b"")) and origin_ok):
                await _plain(send, 403, "changes need the X-RT-Token header (sent by the review page)")
                return
        set_cookie = (
            f"{self.cookie}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode() if by_query else None
        )
        if by_query and method == "GET" and scope.get("path") == "/":
            await _redirect(send, "/", set_cookie)  # the address bar (and history) keep no token
            return
        await self.app(scope, receive, _with_headers(send, set_cookie))

    def _ok(self, given: bytes) -> bool:
        return bool(given) and hmac.compare_digest(given, self.token)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.lower(), v)  # the first of repeated headers (Host must not be given twice anyway)
    return out


def _cookie(headers: dict[bytes, bytes], name: str) -> str:
    raw = headers.get(b"cookie")
    if not raw:
        return ""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw.decode("latin-1"))
    except Exception:  # a malformed Cookie header is no token
        return ""
    morsel = jar.get(name)
    return morsel.value if morsel is not None else ""


def _with_headers(send: Any, set_cookie: bytes | None) -> Any:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() not in dict(SECURITY_HEADERS)]
            headers += SECURITY_HEADERS
            if set_cookie:
                headers.append((b"set-cookie", set_cookie))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _respond(send: Any, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def _plain(send: Any, status: int, text: str) -> None:
    await _respond(send, status, text.encode() + b"\n", b"text/plain; charset=utf-8", [])


async def _html(send: Any, status: int, text: str) -> None:
    await _respond(send, status, text.encode(), b"text/html; charset=utf-8", [])


async def _redirect(send: Any, location: str, set_cookie: bytes | None) -> None:
    extra = [(b"location", location.encode())] + ([(b"set-cookie", set_cookie)] if set_cookie else [])
    await _respond(send, 303, b"", b"text/plain; charset=utf-8", extra)
