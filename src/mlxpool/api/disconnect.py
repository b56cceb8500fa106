"""Cancel a request's work when its client goes away, so the worker drops it at its next step."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class DisconnectWatch:
    """`with DisconnectWatch(receive):` cancels the current task if the client disconnects inside the block, which
    then raises ClientDisconnected. The work stays in the request's own task: awaiting it in a task of its own cost
    every request two more trips through the event loop's queue after its result was ready, and under 64 streams
    a trip can wait behind their tokens. Enter only after the body has been read: from then on the only message
    left is http.disconnect."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self._gone = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.create_task(self._watch())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._watcher.cancel()
        if self._gone:
            self._task.uncancel()  # the cancel was ours: the task goes on (to clean up, or to log the request)
            if kind is not None and issubclass(kind, asyncio.CancelledError):
                raise ClientDisconnected from None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        self._task.cancel()


async def run_until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    with DisconnectWatch(request.receive):
        return await work
