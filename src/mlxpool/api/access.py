"""The request log: one line per HTTP request, written when its response has ended (streams included).

`POST /v1/chat/completions model=chat status=200 ms=812.4 tokens=96`: the model is what the route put in
`request.state.model` and the tokens what it put in `request.state.tokens` (`-` when it set none: GET routes,
errors before the model was resolved, responses without usage).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mlxpool.access")


class AccessLog:
    """ASGI middleware writing the request log through the `mlxpool.access` logger."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500  # an exception that escapes the app becomes a 500 outside this middleware

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info(access_line(scope, state, status, time.perf_counter() - started))


def access_line(scope: Scope, state: dict[str, Any], status: int, seconds: float) -> str:
    model = state.get("model") or "-"
    tokens = state.get("tokens")
    return (
        f"{scope['method']} {scope['path']} model={model} status={status} ms={seconds * 1000:.1f} "
        f"tokens={'-' if tokens is None else tokens}"
    )
