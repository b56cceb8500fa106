from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mlxpool.api.responses import Stream
from tests.api.test_speech import post_streaming


async def test_a_stream_sends_every_piece() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            yield b"data: %d\n\n" % i

    sent = await post_streaming(Stream(pieces(), media_type="text/event-stream"), "/", {})
    assert sent == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


async def test_a_client_that_leaves_cancels_the_generator_and_the_request_task_goes_on() -> None:
    cleaned_up = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield b"data: x\n\n"
        finally:
            cleaned_up.set()  # where the chat route's engine drops the sequence

    sent = await asyncio.wait_for(post_streaming(Stream(forever()), "/", {}, leave_after=3), timeout=10)
    assert cleaned_up.is_set() and 3 <= len(sent) <= 4
    this = asyncio.current_task()
    assert this is not None and this.cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled again
