"""What a request must pass before any route: a Host naming this machine (on a loopback
address), the API key, the limits on requests at once, a JSON body within its size; CORS only
for the origins given; headers that keep the page from being framed or sniffed."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt.serve import api
from gpt.serve.api import APIError
from gpt.serve.stats import Stats


def check_json(headers: Headers) -> None:
    """A POST's body must be declared JSON: a page elsewhere can send a text/plain or form body
    without asking first (no CORS preflight), but not an application/json one."""
    given = headers.get("content-type", "")
    if given.partition(";")[0].strip().lower() != "application/json":
        shown = f"'{api.shown(given)[1:-1]}'" if given else "missing"
        raise APIError(415, f"the Content-Type is {shown}; send the body as JSON with the header "
                            "'Content-Type: application/json'", code="unsupported_media_type")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes: by its Content-Length, or as it arrives."""
    too_large = APIError(413, f"the request body is more than {limit:,} bytes, this server's "
                              "limit; send a shorter one ([serve] max_body_bytes)",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


API_PATHS = ("/v1/", "/metrics")  # behind the API key
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")  # limited by max_connections
MORE_REQUESTS = 64  # answered at once past max_connections: the page, /health, /metrics, ...
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"referrer-policy", b"no-referrer"),
]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or a name) is this machine's own."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_is_loopback(scope: Scope) -> bool:
    """Whether the Host header names this machine (or is absent, as HTTP/1.0 allows). A page
    elsewhere whose name was made to resolve to 127.0.0.1 (DNS rebinding) sends its own name."""
    value = Headers(scope=scope).get("host")
    if value is None:
        return True
    host = value.strip().lower()
    host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    return is_loopback(host)


class Guard:
    """Before any route: the Host header of a server on a loopback address, the API key on the
    API's routes, the limit on generations answered at once (429 past it), a bound on all
    requests at once (503 past it), and headers that keep the page from being framed or
    sniffed."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_in_flight: int, stats: Stats,
                 loopback_only: bool) -> None:
        self.app, self.api_key, self.max_in_flight, self.stats = (
            app, api_key, max_in_flight, stats)
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        path: str = scope["path"]
        refusal = self._refusal(scope, path)
        if refusal is not None:
            self.stats.refused("-", path, refusal.status, refusal.message)
            response = JSONResponse(refusal.body(), status_code=refusal.status,
                                    headers={"WWW-Authenticate": "Bearer"}
                                    if refusal.status == 401 else None)
            await response(scope, receive, send_with_headers)
            return
        generation = path in GENERATION_PATHS
        self.stats.open += 1
        self.stats.in_flight += generation
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.stats.open -= 1
            self.stats.in_flight -= generation

    def _refusal(self, scope: Scope, path: str) -> APIError | None:
        if self.stats.open >= self.max_in_flight + MORE_REQUESTS:
            return APIError(503, f"the server is answering {self.stats.open} requests, its "
                                 "limit; retry shortly", type="server_error",
                            code="server_overloaded")
        if self.loopback_only and not _host_is_loopback(scope):
            return APIError(400, "the Host header does not name this machine; this server "
                                 "listens on a loopback address and answers only localhost, "
                                 "127.0.0.1 or [::1]; use one of those (--host 0.0.0.0 "
                                 "serves every name)",
                            code="invalid_host")
        if not path.startswith(API_PATHS):
            return None
        if self.api_key is not None:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = given.partition(" ")
            if not given:
                return APIError(401, "no API key given; send the header 'Authorization: Bearer "
                                     "KEY' with the server's key", code="invalid_api_key")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    key.strip().encode("latin-1"), self.api_key.encode()):
                return APIError(401, "incorrect API key; send 'Authorization: Bearer KEY' with "
                                     "the key the server was started with",
                                code="invalid_api_key")
        if path in GENERATION_PATHS and self.stats.in_flight >= self.max_in_flight:
            return APIError(429, f"the server is answering {self.max_in_flight} requests, its "
                                 "limit ([serve] max_connections); retry shortly",
                            type="requests", code="rate_limit_exceeded")
        return None


class CORS(CORSMiddleware):
    """Starlette's CORS, whose refused preflight is OpenAI's error JSON, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode(errors="replace")
        error = APIError(response.status_code, f"CORS preflight refused ({reason}); the page's "
                                               "origin must be one given with --cors-origin",
                         code="cors_refused")
        headers = {k: v for k, v in response.headers.items()
                   if k not in ("content-length", "content-type")}
        return JSONResponse(error.body(), status_code=response.status_code, headers=headers)
