"""Responses: JSON that carries numpy arrays, and streams that stop when their client goes."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mlxpool.api.disconnect import ClientDisconnected, DisconnectWatch


class ArrayJSONResponse(JSONResponse):
    """orjson writes float32 rows directly, ~10x faster than json + lists."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class Stream(StreamingResponse):
    """Starlette's StreamingResponse, streamed from the request's own task, which a `DisconnectWatch` cancels when the
    client goes (the generator's work is cancelled with it), as whole responses are (`run_until_disconnect`). Under
    uvicorn (ASGI 2.3) Starlette's own streams from a second task in an anyio task group; the loop's CPU per short
    stream measured the same with either on the CPU box (docs/benchmarks.md, session 13)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with DisconnectWatch(receive):
                await self.stream_response(send)
        except ClientDisconnected:
            return  # nobody left to send to
        if self.background is not None:
            await self.background()
