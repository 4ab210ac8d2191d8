"""Who may call: a bearer token (or HTTP Basic with the token as password, for A1111 clients), compared in
constant time; an Origin check for browser requests that change state; a limit on request bodies.

Both are plain ASGI middleware, so that they answer before any route reads a byte of the body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from urllib.parse import urlsplit

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")  # and "/" with the studio's files
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


async def _reply(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def presented_token(authorization: str) -> str | None:
    """The token in an Authorization header: ``Bearer T``, or ``Basic base64(user:T)``."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def token_ok(expected: str, authorization: str | None) -> bool:
    given = presented_token(authorization or "")
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def origin_ok(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """A browser's Origin may change state when it is the server's own (same host and port) or listed."""
    if origin.rstrip("/") in allowed:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host


def _open(path: str) -> bool:
    return path in OPEN_PATHS or not path.startswith(("/v1", "/sdapi", "/metrics"))


class Guard:
    """Origin check, then the token (when the server has one) for the API's paths."""

    def __init__(self, app, token: str | None, origins: tuple[str, ...] = ()):
        self.app, self.token, self.origins = app, token, tuple(o.rstrip("/") for o in origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin and not origin_ok(origin, headers.get("host"), self.origins):
            return await _reply(send, 403, f"origin '{origin}' may not call this server")
        if self.token and not _open(scope["path"]) and not token_ok(self.token, headers.get("authorization")):
            return await _reply(
                send,
                401,
                "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": 'Bearer, Basic realm="stablekit"'},
            )
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether announced by Content-Length or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _headers(scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _reply(send, 413, f"request body over this server's limit of {self.limit} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.limit:
                return await _reply(send, 413, f"request body over this server's limit of {self.limit} bytes")
        return await self.app(scope, _replay(chunks, receive), send)


def _replay(messages: list, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive
