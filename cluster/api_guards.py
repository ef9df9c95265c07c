"""The HTTP API's guards, plain ASGI middlewares that run before any handler: the Host and
Origin a browser sends (DNS rebinding, other sites' pages), the body's type and size, and the
API key; and, below them, a request HTTP itself cannot parse answered in the API's error shape."""

import hmac
import json
from urllib.parse import urlsplit

import h11
from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api_responses import ApiError

MAX_BODY_BYTES = 8 * 2**20       # a request body larger than this is refused (413) before it is read whole
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class Guard:
    """Before any handler (a plain ASGI middleware, like RequireKey): the Host header must name
    this API (a DNS-rebinding page names its own), an Origin other than this API's own or the
    allowed ones is refused (another site's page in the user's browser), a POST body must be
    JSON and at most MAX_BODY_BYTES, counted as it arrives."""

    def __init__(self, app, hosts: set | None, origins: set):
        self.app, self.hosts, self.origins = app, hosts, origins  # hosts None: any (listening everywhere)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if error := self._refusal(scope):
            return await error.response(scope["path"])(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # stop reading: the handler sees a client that left
                scope["kimi.too_large"] = True
                return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted, send)

    def _refusal(self, scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = _host_name(host)
        if name is None:
            return ApiError(400, f"the Host header {host[:80]!r} is not a host name or address (with an optional "
                                 ":port)", "Host", "invalid_header")
        if self.hosts is not None and name not in self.hosts:
            return ApiError(403, f"Host {host!r} is not this API's address (a page using DNS rebinding?); to "
                                 "reach it under that name, start with --api-allow-host NAME", "Host", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins and _netloc(origin) != host:
            return ApiError(403, f"Origin {origin!r} may not call this API (a page of another site?); to allow "
                                 "it, start with --api-allow-origin ORIGIN", "Origin", "origin_not_allowed")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                                "Content-Type", "unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and not (length.isascii() and length.isdigit()):
                return ApiError(400, f"Content-Length must be a number of bytes, got {length[:40]!r}",
                                "Content-Length", "invalid_header")
            if length is not None and int(length) > MAX_BODY_BYTES:
                return ApiError(413, f"the request body ({length} bytes) is over the limit of {MAX_BODY_BYTES:,} "
                                     "bytes", code="request_too_large")
        return None


def _host_name(host: str) -> str | None:
    """The name in a Host header ("" when there is none), None when it is malformed ("[", "[::1")."""
    try:
        return (urlsplit(f"//{host}").hostname or "") if host else ""
    except ValueError:
        return None


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc
    except ValueError:  # "http://[": no origin of a page, so never this API's own
        return None


def allowed_hosts(api_host: str, extra=()) -> set | None:
    """Host names the API answers to: its own address and loopback names, plus `extra`; None
    (any) when it listens on every address."""
    if api_host in ("0.0.0.0", "::", ""):
        return None
    return LOOPBACK_HOSTS | {api_host.strip("[]")} | set(extra)


class RequireKey:
    """401 on /v1/ unless `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`). A plain
    ASGI middleware: one made with @app.middleware("http") (BaseHTTPMiddleware) hides a client's
    disconnect from a streaming response, which then never stops and never frees its session."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        # /v1 needs the key; /health (for load balancers) and the web view's static files do not
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = Headers(scope=scope)
            bearer = hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.key}".encode())
            x_api_key = hmac.compare_digest(headers.get("x-api-key", "").encode(), self.key.encode())
            if not (bearer or x_api_key):
                response = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` or "
                                         "`x-api-key: <key>`", code="invalid_api_key").response(scope["path"])
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class HttpProtocol(H11Protocol):
    """uvicorn's HTTP/1.1, answering a request it cannot parse (request line, header syntax,
    framing) with a 400 in the API's error shape rather than a line of plain text."""

    def send_400_response(self, msg: str) -> None:
        error = ApiError(400, "the HTTP request is malformed (its request line, a header or its framing): send "
                              "HTTP/1.1 as RFC 9112 describes", code="invalid_http_request")
        body = json.dumps(error.json()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
