from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from mlxpool.api.disconnect import ClientDisconnected, run_until_disconnect


def request_that_disconnects_after(seconds: float | None) -> Request:
    async def receive() -> dict[str, object]:
        if seconds is None:
            await asyncio.Event().wait()
        await asyncio.sleep(seconds or 0)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


async def test_work_is_cancelled_when_the_client_goes_away() -> None:
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with pytest.raises(ClientDisconnected):
        await run_until_disconnect(request_that_disconnects_after(0.01), work())
    assert cancelled.is_set()


async def test_work_that_finishes_first_returns_its_value() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await run_until_disconnect(request_that_disconnects_after(None), work()) == 42


async def test_errors_from_the_work_propagate() -> None:
    async def work() -> int:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await run_until_disconnect(request_that_disconnects_after(None), work())


async def test_work_runs_in_the_request_task_and_a_disconnect_leaves_that_task_usable() -> None:
    caller = asyncio.current_task()

    async def work() -> asyncio.Task[object] | None:
        return asyncio.current_task()

    # In the request's own task: no extra trips through the loop's queue once the result is ready.
    assert await run_until_disconnect(request_that_disconnects_after(None), work()) is caller

    async def slow() -> int:
        await asyncio.sleep(10)
        return 1

    with pytest.raises(ClientDisconnected):
        await run_until_disconnect(request_that_disconnects_after(0.01), slow())
    assert caller is not None and caller.cancelling() == 0
    await asyncio.sleep(0.01)  # the task goes on (to send its error response, say) without being cancelled again
