from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import pytest

from mlxpool.worker import Company, GilSlices, Task, Worker, choose_cuda_attention
from tests.fakes import FakeEngine


async def test_call_runs_on_the_worker_thread(worker: Worker) -> None:
    assert await worker.call(lambda: threading.current_thread().name) == "mlx-worker"


async def test_job_errors_reach_the_caller_and_the_worker_goes_on(worker: Worker) -> None:
    def boom() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        await worker.call(boom)
    assert await worker.call(lambda: 7) == 7


async def test_jobs_and_engines_take_turns_step_by_step(worker: Worker) -> None:
    order: list[str] = []
    a, b = FakeEngine("a", None, steps=order, pending=3), FakeEngine("b", None, steps=order, pending=3)

    def long_load() -> Task[str]:
        for _ in range(3):
            order.append("load")
            yield
        return "loaded"

    job = asyncio.ensure_future(worker.run(long_load()))
    worker.add_engine(a)
    worker.add_engine(b)
    assert (await job)[0] == "loaded"
    while a.pending or b.pending:
        await asyncio.sleep(0.001)
    # No piece of work runs twice in a row while another has some pending: round-robin.
    assert order.count("load") == 3 and order.count("a") == 3 and order.count("b") == 3
    first_a, last_load = order.index("a"), len(order) - 1 - order[::-1].index("load")
    assert first_a < last_load, order
    assert a.threads == b.threads == {"mlx-worker"}


async def test_work_that_arrives_during_a_step_runs_right_after_it(worker: Worker) -> None:
    """A long generation's steps do not go twice in a row past an embedding that arrived during one of them."""
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    class Busy(FakeEngine):
        def step(self) -> None:
            super().step()
            if len(order) == 3:  # the third step: hold it until the other engine has work
                inside.set()
                release.wait(5)

    busy, quick = Busy("busy", None, steps=order, pending=1000), FakeEngine("quick", None, steps=order)
    worker.add_engine(busy)
    worker.add_engine(quick)
    assert await asyncio.to_thread(inside.wait, 5)
    quick.pending = 1
    worker.wake()
    release.set()
    while quick.pending:
        await asyncio.sleep(0.001)
    busy.pending = 0
    assert order[:4] == ["busy"] * 3 + ["quick"], order[:6]


async def test_job_reports_the_memory_it_allocated(worker: Worker) -> None:
    def allocate() -> Task[mx.array]:
        x = mx.ones((1024, 256), dtype=mx.float32)
        mx.eval(x)
        yield
        return x

    array, allocated = await worker.run(allocate())
    assert allocated >= 1024 * 256 * 4
    del array


async def test_a_cancelled_waiter_does_not_break_the_worker(worker: Worker) -> None:
    gate = threading.Event()

    def slow() -> Task[int]:
        while not gate.is_set():
            yield
        return 1

    waiting = asyncio.ensure_future(worker.run(slow()))
    await asyncio.sleep(0.01)
    waiting.cancel()
    gate.set()
    assert await worker.call(lambda: 2) == 2


def test_cuda_attention_is_chosen_unless_the_environment_chose() -> None:
    environ: dict[str, str] = {}
    choose_cuda_attention(False, environ)
    assert environ == {"MLX_CUDA_USE_CUDNN_SDPA": "0"}
    choose_cuda_attention(True, environ)  # already set: the environment wins
    assert environ == {"MLX_CUDA_USE_CUDNN_SDPA": "0"}
    fresh: dict[str, str] = {}
    choose_cuda_attention(True, fresh)
    assert fresh == {"MLX_CUDA_USE_CUDNN_SDPA": "1"}


def test_the_worker_has_company_while_two_items_have_work_and_for_a_hold_after() -> None:
    now = [0.0]
    company = Company(hold=1.0, clock=lambda: now[0])
    assert not company.observe(1)
    assert company.observe(2)
    now[0] = 0.9
    assert company.observe(1)  # the other model's next request is likely on its way
    now[0] = 1.1
    assert not company.observe(1)
    assert not company.observe(0)


@dataclass
class IntervalEngine(FakeEngine):
    intervals: list[float] = field(default_factory=list)

    def step(self) -> None:
        self.intervals.append(sys.getswitchinterval())
        super().step()


@pytest.fixture
def switch_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("switch_interval")
async def test_the_worker_shortens_gil_slices_while_two_engines_have_work() -> None:
    now = [0.0]
    worker = Worker(GilSlices(alone=0.004, shared=0.0015), clock=lambda: now[0])
    a, b = IntervalEngine("a", None), IntervalEngine("b", None)
    worker.start()
    try:
        worker.add_engine(a)
        worker.add_engine(b)

        async def run(*work: tuple[IntervalEngine, int]) -> None:
            for engine, steps in work:
                engine.pending = steps
            worker.wake()
            while any(engine.pending for engine, _ in work):
                await asyncio.sleep(0.001)

        await run((a, 2))
        assert a.intervals == [pytest.approx(0.004)] * 2
        await run((a, 3), (b, 3))
        # a may take one step alone before b's work is set; from b's first step on, both have work
        assert b.intervals[0] == a.intervals[-1] == pytest.approx(0.0015)
        now[0] = 2.0
        a.intervals.clear()
        await run((a, 2))
        assert a.intervals == [pytest.approx(0.004)] * 2
    finally:
        worker.stop()


@dataclass
class PiecesEngine(FakeEngine):
    """A step in three pieces, handing the worker over between them; `arrive` runs after the first piece."""

    worker: Worker | None = None
    arrive: Callable[[], None] = lambda: None

    def step(self) -> None:
        for piece in range(3):
            self.steps.append(f"{self.name}{piece}")
            if piece == 0:
                self.arrive()
            if piece < 2 and self.worker is not None:
                self.worker.between_pieces()
        super().step()


@dataclass
class TimedPieces(PiecesEngine):
    """Its steps take `cost` seconds of a shared fake clock."""

    now: list[float] = field(default_factory=lambda: [0.0])
    cost: float = 0.0

    def step(self) -> None:
        self.now[0] += self.cost
        super().step()


@pytest.fixture
def timed() -> Iterator[tuple[Worker, list[float]]]:
    """A started worker that waits in pieces, on a fake clock that `TimedPieces` steps move on."""
    now = [0.0]
    worker = Worker(waits_in_pieces=True, clock=lambda: now[0])
    worker.start()
    yield worker, now
    worker.stop()


async def step_alone(worker: Worker, *engines: TimedPieces) -> None:
    """One step of each engine in turn, with no other work (the worker times it)."""
    for engine in engines:
        engine.pending = 1
        worker.wake()
        while engine.pending:
            await asyncio.sleep(0.001)


async def test_engines_with_work_step_between_the_pieces_of_another_step(timed: tuple[Worker, list[float]]) -> None:
    (worker, now), order = timed, list[str]()
    loading = threading.Event()

    def load() -> Task[str]:
        loading.set()
        while "long" not in order:  # until `long` has taken its step
            order.append("load")
            yield
        return "loaded"

    def arrive() -> None:  # work for the other engine and the load arrive while `long` is in its step
        quick.pending = 2

    long = TimedPieces("long", None, steps=order, worker=worker, now=now, cost=0.010)
    quick = TimedPieces("quick", None, steps=order, worker=worker, now=now, cost=0.001)  # does not hand over again
    worker.add_engine(long)
    worker.add_engine(quick)
    await step_alone(worker, long, quick)  # engines not yet timed keep their turn
    order.clear()
    long.arrive = arrive
    job = asyncio.ensure_future(worker.run(load()))
    await asyncio.to_thread(loading.wait, 5)
    order.clear()
    long.pending = 1
    worker.wake()
    await job
    step = order[order.index("long0") : order.index("long") + 1]
    quick_step = ["quick0", "quick1", "quick2", "quick"]
    assert step == ["long0", *quick_step, "long1", *quick_step, "long2", "long"], order
    assert worker.steps_between == 2


async def test_engines_whose_steps_are_longer_keep_their_turn_between_whole_steps(
    timed: tuple[Worker, list[float]],
) -> None:
    """An engine whose steps take longer than the current item's own (an ASR window beside a chat decode step) does
    not step between its pieces; one with shorter steps does, and its time is not counted as the item's."""
    (worker, now), order = timed, list[str]()
    quick = TimedPieces("quick", None, steps=order, now=now, cost=0.001)
    slow = TimedPieces("slow", None, steps=order, now=now, cost=0.0105)  # longer than long's own 10 ms, not 11

    def arrive() -> None:
        quick.pending = slow.pending = 1

    long = TimedPieces("long", None, steps=order, worker=worker, now=now, cost=0.010)
    for engine in (slow, quick, long):
        worker.add_engine(engine)
    await step_alone(worker, slow, quick, long)
    long.arrive = arrive
    for _ in range(2):  # the second time too: the quick step taken between long's pieces is not long's
        order.clear()
        await step_alone(worker, long)
        while slow.pending:
            await asyncio.sleep(0.001)
        step = order[: order.index("long") + 1]
        assert step == ["long0", "quick0", "quick1", "quick2", "quick", "long1", "long2", "long"], order
        assert order[order.index("long") + 1 :] == ["slow0", "slow1", "slow2", "slow"]
    slow.cost = 0.0  # a short step (an ASR job's last) does not make its steps short
    await step_alone(worker, slow)
    order.clear()
    await step_alone(worker, long)
    while slow.pending:
        await asyncio.sleep(0.001)
    assert order[order.index("long") + 1 :] == ["slow0", "slow1", "slow2", "slow"]


async def test_engines_not_yet_timed_keep_their_turn(timed: tuple[Worker, list[float]]) -> None:
    """Before its first step an engine's length is unknown: it neither has others step between its pieces nor steps
    between another's."""
    (worker, now), order = timed, list[str]()
    quick = TimedPieces("quick", None, steps=order, now=now, cost=0.001)
    fresh = TimedPieces("fresh", None, steps=order, now=now, cost=0.001)  # a model just loaded
    long = TimedPieces("long", None, steps=order, worker=worker, now=now, cost=0.010)
    worker.add_engine(quick)
    await step_alone(worker, quick)

    async def step_long(arrive: Callable[[], None]) -> None:
        order.clear()
        long.arrive = arrive
        await step_alone(worker, long)
        while quick.pending or fresh.pending:
            await asyncio.sleep(0.001)

    def only_quick() -> None:
        quick.pending = 1

    def both() -> None:
        quick.pending = fresh.pending = 1

    worker.add_engine(long)
    await step_long(only_quick)  # long's first step
    assert order == ["long0", "long1", "long2", "long", "quick0", "quick1", "quick2", "quick"]
    worker.add_engine(fresh)
    await step_long(both)  # fresh's first step
    assert order[:8] == ["long0", "quick0", "quick1", "quick2", "quick", "long1", "long2", "long"]
    assert order[8:] == ["fresh0", "fresh1", "fresh2", "fresh"]


async def test_an_item_hands_over_only_while_a_quicker_engine_keeps_it_company(
    timed: tuple[Worker, list[float]],
) -> None:
    """`hands_over` (which cuts and waits in pieces, engines/pieces.py) holds for a step only when the worker is
    shared and another engine's steps are no longer than the item's: beside only slower engines a chat step stays
    whole."""
    (worker, now), order = timed, list[str]()
    seen: list[bool] = []
    long = TimedPieces("long", None, steps=order, worker=worker, now=now, cost=0.010)
    slow = TimedPieces("slow", None, steps=order, now=now, cost=0.050)
    quick = TimedPieces("quick", None, steps=order, now=now, cost=0.001)
    for engine in (long, slow, quick):
        worker.add_engine(engine)
    await step_alone(worker, long, slow)
    long.arrive = lambda: seen.append(worker.hands_over)

    async def together(*engines: TimedPieces) -> None:
        for engine in engines:
            engine.pending = 1
        worker.wake()
        while any(engine.pending for engine in engines):
            await asyncio.sleep(0.001)

    await together(long, slow)
    assert seen == [False] and worker.shared  # company, but slower
    await step_alone(worker, quick)
    await together(long, slow)
    assert seen == [False, True]
    now[0] += 2.0  # a while later, alone
    await step_alone(worker, long)
    assert seen == [False, True, False] and not worker.shared


async def test_where_only_costly_steps_are_cut_every_engine_with_work_steps_between_pieces() -> None:
    """Not waiting in pieces (a GPU): the lengths are not compared; a slower engine, even one not yet timed, steps
    between the pieces too."""
    now, order = [0.0], list[str]()
    worker = Worker(clock=lambda: now[0])
    slow = TimedPieces("slow", None, steps=order, now=now, cost=0.050)
    long = TimedPieces("long", None, steps=order, worker=worker, now=now, cost=0.010)
    worker.add_engine(slow)
    worker.add_engine(long)
    worker.start()
    try:

        def arrive() -> None:
            slow.pending = 1

        long.arrive = arrive
        await step_alone(worker, long)
        assert order == ["long0", "slow0", "slow1", "slow2", "slow", "long1", "long2", "long"]
    finally:
        worker.stop()


async def test_without_waiting_in_pieces_a_step_hands_over_while_another_engine_is_loaded() -> None:
    """Beside a load alone (a job, which never steps between pieces) a costly step is not cut; beside another
    engine it is, whatever that engine's step length."""
    seen: list[bool] = []
    worker = Worker()
    long = TimedPieces("long", None, worker=worker)
    long.arrive = lambda: seen.append(worker.hands_over)
    worker.add_engine(long)
    worker.start()
    try:

        def load() -> Task[None]:
            while not seen:  # until long has taken a step beside it
                long.pending = 1
                yield

        await worker.run(load())
        assert worker.shared and seen == [False]
        worker.add_engine(TimedPieces("slow", None))
        await step_alone(worker, long)
        assert seen == [False, True]
    finally:
        worker.stop()


def test_between_pieces_does_nothing_off_the_worker_thread() -> None:
    worker = Worker()
    quick = FakeEngine("quick", None, pending=1)
    worker.add_engine(quick)
    worker.between_pieces()
    assert quick.pending == 1
