"""The request log: one line per HTTP request, written when its response has ended (streams included).

`POST /v1/chat/completions model=chat status=200 ms=812.4 tokens=96`: the model is what the route put in
`request.state.model` and the tokens what it put in `request.state.tokens` (`-` when it set none: GET routes,
errors before the model was resolved, responses without usage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mlxpool.access")


Record = Callable[[Scope, dict[str, Any], int, float], None]
"""Called with (scope, request state, status, seconds) once a response has ended."""


class RequestObserver:
    """ASGI middleware: times each HTTP request to the end of its response and hands it to `records` (the request
    log, the metrics)."""

    def __init__(self, app: ASGIApp, records: Sequence[Record]):
        self.app = app
        self.records = records

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
            seconds = time.perf_counter() - started
            for record in self.records:
                record(scope, state, status, seconds)


def log_request(scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
    log.info(access_line(scope, state, status, seconds))


def access_line(scope: Scope, state: dict[str, Any], status: int, seconds: float) -> str:
    model = state.get("model") or "-"
    tokens = state.get("tokens")
    return (
        f"{scope['method']} {scope['path']} model={model} status={status} ms={seconds * 1000:.1f} "
        f"tokens={'-' if tokens is None else tokens}"
    )
