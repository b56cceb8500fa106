"""The worker: the one thread that calls MLX.

Work arrives as steps. A `Job` is a generator run one `next()` per step (a model load yields between weight
slices); an engine is a `Steppable` that does one bounded unit of its pending work per step (one embedding
micro-batch). The worker round-robins over everything runnable, so no single piece of work holds it for long.
Results go back to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

import mlx.core as mx

log = logging.getLogger(__name__)
T = TypeVar("T")
Task = Generator[None, None, T]
GC_SLACK = 2**20


class Steppable(Protocol):
    def has_work(self) -> bool: ...

    def step(self) -> None: ...


def deliver(future: asyncio.Future[T], result: T | None = None, error: BaseException | None = None) -> None:
    """Resolve a loop future from the worker thread; a future the client gave up on is left alone."""

    def resolve() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    future.get_loop().call_soon_threadsafe(resolve)


class Job:
    """A generator task plus the loop future waiting for its return value; counts the MLX memory it allocates."""

    def __init__(self, task: Task[Any], future: asyncio.Future[Any]):
        self.task = task
        self.future = future
        self.allocated = 0
        self.done = False

    def step(self) -> None:
        before = mx.get_active_memory()
        try:
            next(self.task)
        except StopIteration as stop:
            self.done = True
            self.allocated += mx.get_active_memory() - before
            deliver(self.future, (stop.value, self.allocated))
            return
        except BaseException as exc:
            self.done = True
            deliver(self.future, error=exc)
            return
        self.allocated += mx.get_active_memory() - before


class Worker:
    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._jobs: list[Job] = []
        self._engines: list[Steppable] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self.active_memory = 0
        """MLX active memory in bytes, refreshed after every step (read by the loop without calling MLX)."""
        self.baseline_memory = 0
        """MLX active memory when the worker started, before any model: what the budget comes on top of."""
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        """Tell the worker that an engine has new work."""
        with self._wake:
            self._wake.notify()

    def add_engine(self, engine: Steppable) -> None:
        with self._wake:
            self._engines.append(engine)
            self._wake.notify()

    def remove_engine(self, engine: Steppable) -> None:
        with self._wake:
            self._engines.remove(engine)

    async def run(self, task: Task[T]) -> tuple[T, int]:
        """Run a generator task step by step on the worker; returns its value and the bytes it allocated."""
        future: asyncio.Future[tuple[T, int]] = asyncio.get_running_loop().create_future()
        with self._wake:
            self._jobs.append(Job(task, future))
            self._wake.notify()
        return await future

    async def call(self, fn: Callable[[], T]) -> T:
        """Run one plain function on the worker as a single step."""

        def task() -> Task[T]:
            return fn()
            yield  # makes this a generator

        value, _ = await self.run(task())
        return value

    def _runnable(self) -> list[Job | Steppable]:
        with self._wake:
            while not self._stopping:
                ready: list[Job | Steppable] = [*self._jobs, *(e for e in self._engines if e.has_work())]
                if ready:
                    return ready
                self._wake.wait()
            return []

    def _run(self) -> None:
        self.baseline_memory = self.active_memory = mx.get_active_memory()
        while ready := self._runnable():
            for item in ready:
                try:
                    item.step()
                except Exception:
                    log.exception("worker step failed in %r", item)
                self.steps += 1
            with self._wake:
                self._jobs = [job for job in self._jobs if not job.done]
            self.active_memory = mx.get_active_memory()


def release_memory(target: int = 0) -> int:
    """Return MLX's cache to the system (worker only); returns the active bytes left.

    Refcounting frees most arrays at once; the slow full garbage collection (100+ ms with big libraries
    imported) runs only when that left more than GC_SLACK bytes above `target` (arrays held by reference cycles).
    """
    mx.clear_cache()
    if mx.get_active_memory() > target + GC_SLACK:
        gc.collect()
        mx.clear_cache()
    return int(mx.get_active_memory())
