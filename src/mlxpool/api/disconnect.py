"""Cancel a request's work when its client goes away, so the worker drops it at its next step."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def run_until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected.

    `work` runs in the request's own task and a watcher task cancels that task when the client goes; awaiting
    `work` in a task of its own cost each request two more trips through the event loop's queue after its result
    was ready, and under 64 streams a trip waits for their tokens (docs/benchmarks.md).
    Call only after the body has been read: from then on the only message left is http.disconnect.
    """
    this = asyncio.current_task()
    assert this is not None
    gone = asyncio.Event()

    async def watch() -> None:
        await _disconnected(request)
        gone.set()
        this.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        this.uncancel()
        raise ClientDisconnected from None
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
