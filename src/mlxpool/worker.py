"""The worker: the one thread that calls MLX.

Work arrives as steps. A `Job` is a generator run one `next()` per step (a model load yields between weight
slices); an engine is a `Steppable` that does one bounded unit of its pending work per step (one embedding
micro-batch). Each step goes to the runnable item served least recently, so work that arrives while another
engine's step runs goes next, after that one step; nothing holds the worker for longer. A chat batch's costly steps
go further: they hand over between pieces of their forward pass while other models keep it company (`hands_over`,
`between_pieces`, engines/pieces.py), so an embedding waits for a piece of such a step, not all of it.
Results go back to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import mlx.core as mx

log = logging.getLogger(__name__)
T = TypeVar("T")
Task = Generator[None, None, T]
GC_SLACK = 2**20
RECENT_STEPS = 4


def choose_cuda_attention(cudnn: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Whether MLX's CUDA backend reads prompts with cuDNN's attention (see `ServerSettings.cudnn_attention`). MLX
    reads the variable once, at its first attention, so this runs before any model does; a value already set wins."""
    environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "1" if cudnn else "0")


class Company:
    """Whether other items keep the worker's current one company: true while two or more items have had work within
    the last `hold` seconds (the other model's next request is likely on its way)."""

    def __init__(self, hold: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.hold = hold
        self._clock = clock
        self._until = -float("inf")

    def observe(self, runnable: int) -> bool:
        """Whether the worker is shared, now that `runnable` items have work."""
        now = self._clock()
        if runnable > 1:
            self._until = now + self.hold
        return now < self._until


@dataclass(frozen=True)
class GilSlices:
    """How long a thread may hold Python's GIL while another waits: `shared` seconds while the worker has company,
    `alone` otherwise. The worker builds each step's graph in Python; short slices let the event loop answer one
    model's requests while another model decodes, and a model working alone keeps the longer slices its throughput
    needs."""

    alone: float
    shared: float


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
    def __init__(
        self, gil: GilSlices | None = None, pieces: int = 1, waits_in_pieces: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self._wake = threading.Condition()
        self._gil = gil
        self.pieces = pieces
        """Pieces a text model's forward pass is cut into while the worker has company (engines/pieces.py)."""
        self.waits_in_pieces = waits_in_pieces
        """While the worker has company, text models cut every batch step and wait for it piece by piece (MLX's CPU
        backend: engines/pieces.py)."""
        self._company = Company(clock=clock)
        self.shared = False
        """Two or more items have had work lately (set before each step)."""
        self.hands_over = False
        """The item stepping now hands the worker over between the pieces of its step: the worker is shared and
        another engine may step between them (`_may_step_between`; set before each step; engines/pieces.py)."""
        self._items: list[Job | Steppable] = []
        """Jobs and engines, least recently stepped first."""
        self._current: Job | Steppable | None = None
        self._between = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self.active_memory = 0
        """MLX active memory in bytes, refreshed after every step (read by the loop without calling MLX)."""
        self.baseline_memory = 0
        """MLX active memory when the worker started, before any model: what the budget comes on top of."""
        self.steps = 0
        self.steps_between = 0
        """Engine steps run between the pieces of another item's step."""
        self._clock = clock
        self._took: dict[int, deque[float]] = {}
        """Each engine's last few steps, in seconds of its own (the steps taken between its pieces not counted), by
        id."""
        self._nested = 0.0
        """Seconds of all the steps taken between pieces so far."""

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
            self._items.insert(0, engine)
            self._wake.notify()

    def remove_engine(self, engine: Steppable) -> None:
        with self._wake:
            self._items.remove(engine)
            self._took.pop(id(engine), None)

    async def run(self, task: Task[T]) -> tuple[T, int]:
        """Run a generator task step by step on the worker; returns its value and the bytes it allocated."""
        future: asyncio.Future[tuple[T, int]] = asyncio.get_running_loop().create_future()
        with self._wake:
            self._items.insert(0, Job(task, future))
            self._wake.notify()
        return await future

    async def call(self, fn: Callable[[], T]) -> T:
        """Run one plain function on the worker as a single step."""

        def task() -> Task[T]:
            return fn()
            yield  # makes this a generator

        value, _ = await self.run(task())
        return value

    def between_pieces(self) -> None:
        """Called by the item stepping now, between pieces of its step (worker only): every other engine with work
        takes a step here, on MLX's default stream, so it waits for a piece rather than the whole step. Jobs (model
        loads) keep their turn between whole steps, and so, while the worker waits in pieces, do engines whose steps
        are longer than the current item's (`_may_step_between`). A step taken here does not hand over again."""
        if self._current is None or self._between or threading.current_thread() is not self._thread:
            return
        self._between = True
        try:
            with mx.stream(mx.default_stream(mx.default_device())):
                for engine in self._waiting_engines():
                    self._step(engine)
                    self.steps_between += 1
        finally:
            self._between = False

    def _waiting_engines(self) -> list[Steppable]:
        """The engines that may step between the current item's pieces (`_may_step_between`) and have work, least
        recently stepped first (they move back)."""
        with self._wake:
            engines = [i for i in self._may_step_between(self._current) if i.has_work()]
            for engine in engines:
                self._items.remove(engine)
                self._items.append(engine)
        return engines

    def _may_step_between(self, item: Job | Steppable | None) -> list[Steppable]:
        """The other engines that may step between `item`'s pieces. Where only costly steps are cut, all of them: such
        steps are rare, and an embedding's step is about as long as a chat decode step there (H200), so comparing
        lengths would keep out the very engines the cut is for. Where the worker waits for every step in pieces, only
        those whose steps are no longer than `item`'s (none while either is not yet timed): every step hands over,
        and an engine with long steps (an ASR window beside a chat step) would step at every piece of every step."""
        others = [i for i in self._items if i is not item and not isinstance(i, Job)]
        if not self.waits_in_pieces:
            return others
        longest = self._longest_step(item)
        return [i for i in others if self._longest_step(i) <= longest < math.inf]

    def _longest_step(self, item: Job | Steppable | None) -> float:
        """The longest of an engine's last few steps (an ASR job's short last step says nothing of its windows);
        infinite before its first."""
        took = self._took.get(id(item))
        return max(took) if took else math.inf

    def _next(self) -> Job | Steppable | None:
        """The runnable item stepped least recently (it moves to the back), or None when stopping."""
        with self._wake:
            while not self._stopping:
                runnable = [i for i, item in enumerate(self._items) if _runnable(item)]
                if runnable:
                    self._pace(len(runnable))
                    item = self._items.pop(runnable[0])
                    self._items.append(item)
                    return item
                self._wake.wait()
            return None

    def _pace(self, runnable: int) -> None:
        self.shared = self._company.observe(runnable)
        if self._gil is not None:
            interval = self._gil.shared if self.shared else self._gil.alone
            if interval != sys.getswitchinterval():
                sys.setswitchinterval(interval)

    def _run(self) -> None:
        self.baseline_memory = self.active_memory = mx.get_active_memory()
        while (item := self._next()) is not None:
            self._current = item
            with self._wake:
                self.hands_over = self.shared and bool(self._may_step_between(item))
            try:
                self._step(item)
            finally:
                self._current = None

    def _step(self, item: Job | Steppable) -> None:
        start, nested = self._clock(), self._nested
        try:
            item.step()
        except Exception:
            log.exception("worker step failed in %r", item)
        took = self._clock() - start
        if not isinstance(item, Job):
            self._took.setdefault(id(item), deque(maxlen=RECENT_STEPS)).append(took - (self._nested - nested))
        if self._between:
            self._nested += took
        self.steps += 1
        if isinstance(item, Job) and item.done:
            with self._wake:
                self._items.remove(item)
        self.active_memory = mx.get_active_memory()


def _runnable(item: Job | Steppable) -> bool:
    return not item.done if isinstance(item, Job) else item.has_work()


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
