from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import Message

from mlxpool.api.responses import Stream


async def call(stream: Stream, leave_after: int | None) -> list[Message]:
    """Run `stream` as uvicorn would; the client disconnects once `leave_after` body pieces have arrived."""
    sent: list[Message] = []
    gone = asyncio.Event()
    requests: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if leave_after is not None and sum(m["type"] == "http.response.body" for m in sent) == leave_after:
            gone.set()

    await receive()  # the route read its body before responding
    await stream({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, send)
    return sent


async def test_a_stream_sends_every_piece_then_ends() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            yield b"data: %d\n\n" % i

    sent = await call(Stream(pieces(), media_type="text/event-stream"), leave_after=None)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False


async def test_a_client_that_leaves_cancels_the_generator_and_the_request_task_goes_on() -> None:
    cleaned_up = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield b"data: x\n\n"
        finally:
            cleaned_up.set()  # where the chat route's engine drops the sequence

    sent = await asyncio.wait_for(call(Stream(forever()), leave_after=3), timeout=10)
    assert cleaned_up.is_set() and 3 <= len(sent) - 1 <= 4
    this = asyncio.current_task()
    assert this is not None and this.cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled again
