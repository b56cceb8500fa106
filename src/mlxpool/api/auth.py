"""API keys and CORS: who may call the server, and which web pages may call it from a browser."""

from __future__ import annotations

import hmac

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mlxpool.api.errors import error_body
from mlxpool.config import ServerSettings

OPEN_PATHS = {"/health", "/"}
"""Answered without a key: the liveness check, and the status page's HTML (it holds no data; the calls it makes
for data need the key)."""


def security_middleware(server: ServerSettings) -> list[Middleware]:
    """CORS (when origins are configured) outside API keys (when keys are), so preflights need no key."""
    middleware = []
    if server.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=server.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["Retry-After"],
            )
        )
    if server.api_keys:
        middleware.append(Middleware(ApiKeys, keys=server.api_keys))
    return middleware


class ApiKeys:
    """ASGI middleware: every request but `OPEN_PATHS` needs `Authorization: Bearer KEY` with a configured key."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await unauthorized()(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS

    def authorized(self, scope: Scope) -> bool:
        """True when the request's bearer token is one of the keys; compared in constant time, with every key."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched


def unauthorized() -> JSONResponse:
    message = "Missing or invalid API key: send the header `Authorization: Bearer KEY` with a key this server knows."
    body = error_body(message, "invalid_request_error", None, "invalid_api_key")
    return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
