"""The pool's lifecycle with fake engines (real MLX allocations of known size), a real worker, a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlxpool.errors import (
    MemoryBudgetError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    ServiceUnavailableError,
)
from mlxpool.pool import ModelPool, ModelState
from mlxpool.worker import Worker
from tests.conftest import make_settings
from tests.fakes import FakeClock, FakeLoader

MB = 2**20
PoolFactory = Callable[..., ModelPool]


@pytest.fixture
async def make_pool(tmp_path: Path) -> AsyncIterator[PoolFactory]:
    worker = Worker()
    worker.start()
    pools: list[ModelPool] = []

    def make(models: dict[str, dict[str, Any]], loader: FakeLoader, budget: int = 3 * MB, **server: Any) -> ModelPool:
        for name, spec in models.items():
            spec.setdefault("kind", "embedding")
            spec.setdefault("path", str(tmp_path))
            # Estimates carry a reserve; 4 KiB covers the few bytes a backend allocates beside the weights.
            spec.setdefault("memory_reserve", loader.sizes.get(name, 4096) + 4096)
        server.setdefault("load_timeout", 5)
        pool = ModelPool(make_settings(models, **server), worker, budget, loader=loader, clock=FakeClock())
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()
    worker.stop()


def clock(pool: ModelPool) -> FakeClock:
    assert isinstance(pool.clock, FakeClock)
    return pool.clock


async def settle(pool: ModelPool) -> None:
    """Wait until no load or unload is in flight."""
    while any(e.transition is not None for e in pool.entries.values()):
        await asyncio.sleep(0.005)


def state(pool: ModelPool, name: str) -> ModelState:
    return pool.entries[name].state


async def use(pool: ModelPool, name: str) -> None:
    async with pool.acquire(name):
        clock(pool).advance(1)


async def test_names_aliases_repo_ids_and_openai_names_resolve(make_pool: PoolFactory) -> None:
    loader = FakeLoader({})
    pool = make_pool({"emb": {"aliases": ["embedding"], "default": True}, "other": {}}, loader)
    assert pool.resolve("emb") is pool.resolve("embedding") is pool.resolve("text-embedding-3-small")
    assert pool.resolve("other").spec.name == "other"
    with pytest.raises(ModelNotFoundError) as err:
        pool.resolve("whisper-1")
    assert err.value.status == 404 and err.value.code == "model_not_found"


async def test_concurrent_requests_share_one_load(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB}, slices=4)
    pool = make_pool({"a": {}}, loader)

    async def request() -> None:
        async with pool.acquire("a") as engine:
            assert engine is loader.engines["a"]

    await asyncio.gather(*(request() for _ in range(20)))
    assert loader.calls == ["a"]
    assert state(pool, "a") is ModelState.READY


async def test_loads_run_on_the_worker_thread(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {}}, loader)
    await use(pool, "a")
    assert loader.threads == {"mlx-worker"}
    assert threading.current_thread().name != "mlx-worker"


async def test_measured_memory_is_what_the_load_allocated(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": 2 * MB}, slices=2)
    pool = make_pool({"a": {}}, loader)
    await use(pool, "a")
    measured = pool.entries["a"].measured
    assert measured is not None and 2 * MB <= measured < 2 * MB + 64 * 1024


async def test_idle_lru_model_is_evicted_to_fit_a_new_one(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB, "b": MB, "c": MB})
    pool = make_pool({"a": {}, "b": {}, "c": {}}, loader, budget=2 * MB + MB // 2)
    await use(pool, "a")
    await use(pool, "b")
    await use(pool, "a")  # a is now more recent than b
    await use(pool, "c")
    await settle(pool)
    states = {name: e.state for name, e in pool.entries.items()}
    assert states == {"a": ModelState.READY, "b": ModelState.ABSENT, "c": ModelState.READY}
    assert loader.engines["b"].closed


async def test_pinned_model_is_never_evicted(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"pin": MB, "b": MB, "c": MB})
    pool = make_pool({"pin": {"pinned": True}, "b": {}, "c": {}}, loader, budget=2 * MB + MB // 2)
    await use(pool, "pin")
    clock(pool).advance(10)
    await use(pool, "b")
    await use(pool, "c")
    await settle(pool)
    assert state(pool, "pin") is ModelState.READY
    assert state(pool, "b") is ModelState.ABSENT


async def test_leased_model_is_not_evicted_and_the_newcomer_waits_for_it(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": 2 * MB, "b": 2 * MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB)
    async with pool.acquire("a"):
        waiting = asyncio.create_task(use(pool, "b"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        assert state(pool, "a") is ModelState.READY and "b" not in loader.calls
    await asyncio.wait_for(waiting, 5)
    assert state(pool, "a") is ModelState.ABSENT
    assert state(pool, "b") is ModelState.READY


async def test_no_memory_in_time_is_a_503_with_retry_after(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": 2 * MB, "b": 2 * MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB, load_timeout=0.2)
    async with pool.acquire("a"):
        with pytest.raises(MemoryBudgetError) as err:
            await use(pool, "b")
    assert err.value.status == 503 and err.value.retry_after
    assert state(pool, "b") is ModelState.ABSENT
    await use(pool, "b")  # memory is free now: the next request loads it
    assert state(pool, "b") is ModelState.READY


async def test_model_larger_than_the_budget_fails_at_once(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"huge": 10 * MB})
    pool = make_pool({"huge": {}}, loader, budget=3 * MB)
    with pytest.raises(ModelTooLargeError, match="more than the whole memory budget"):
        await use(pool, "huge")
    assert loader.calls == []


async def test_budget_is_never_exceeded_under_concurrent_mixed_use(make_pool: PoolFactory) -> None:
    sizes = {f"m{i}": MB * (1 + i % 3) for i in range(6)}
    loader = FakeLoader(sizes, slices=2)
    pool = make_pool({name: {} for name in sizes}, loader, budget=5 * MB)
    peak = 0
    stop = False

    async def watch() -> None:
        nonlocal peak
        while not stop:
            peak = max(peak, pool.used())
            await asyncio.sleep(0)

    async def client(k: int) -> None:
        for j in range(8):
            async with pool.acquire(f"m{(k * 7 + j * 3) % 6}"):
                await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(client(k) for k in range(6)))
    stop = True
    await watcher
    assert 0 < peak <= pool.budget
    assert len(loader.calls) > 6  # churn happened: models were evicted and loaded again


async def test_idle_ttl_unloads_on_the_clock(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {"ttl": 60}}, loader)
    await use(pool, "a")
    clock(pool).advance(59)
    assert state(pool, "a") is ModelState.READY
    clock(pool).advance(2)
    await settle(pool)
    assert state(pool, "a") is ModelState.ABSENT


async def test_a_lease_restarts_the_idle_countdown(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {"ttl": 60}}, loader)
    await use(pool, "a")
    clock(pool).advance(50)
    async with pool.acquire("a"):
        clock(pool).advance(100)  # leased: the old timer must not fire
        assert state(pool, "a") is ModelState.READY
    clock(pool).advance(59)
    await settle(pool)
    assert state(pool, "a") is ModelState.READY
    clock(pool).advance(1)
    await settle(pool)
    assert state(pool, "a") is ModelState.ABSENT


async def test_ttl_zero_unloads_when_the_last_request_ends(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {"ttl": 0}}, loader)
    async with pool.acquire("a"), pool.acquire("a"):
        pass
    await settle(pool)
    assert state(pool, "a") is ModelState.ABSENT
    assert loader.calls == ["a"]


async def test_failed_load_cools_down_then_retries_with_growing_cooldown(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"bad": MB}, fail={"bad"})
    pool = make_pool({"bad": {}}, loader, failure_cooldown=10)
    with pytest.raises(ModelLoadError, match="cannot load bad") as err:
        await use(pool, "bad")
    assert err.value.status == 503 and err.value.retry_after == 10
    with pytest.raises(ModelLoadError, match="retrying in"):
        await use(pool, "bad")
    assert loader.calls == ["bad"]  # no new attempt during the cooldown
    clock(pool).advance(11)
    with pytest.raises(ModelLoadError):
        await use(pool, "bad")
    assert loader.calls == ["bad", "bad"]
    assert pool.entries["bad"].retry_at - clock(pool).now() == 20  # doubled
    loader.fail.clear()
    clock(pool).advance(21)
    await use(pool, "bad")
    assert state(pool, "bad") is ModelState.READY and pool.entries["bad"].failures == 0


async def test_failed_load_returns_its_memory(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"bad": MB}, fail={"bad"})
    pool = make_pool({"bad": {}}, loader)
    with pytest.raises(ModelLoadError):
        await use(pool, "bad")
    assert pool.used() == 0


async def test_unload_returns_active_memory_to_baseline(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": 4 * MB})
    pool = make_pool({"a": {}}, loader, budget=8 * MB)
    baseline = await pool.worker.call(mx.get_active_memory)
    await use(pool, "a")
    assert await pool.worker.call(mx.get_active_memory) >= baseline + 4 * MB
    del loader.engines["a"]
    await pool.unload("a")
    assert await pool.worker.call(mx.get_active_memory) == baseline
    assert pool.used() == 0


async def test_unload_waits_for_requests_in_flight(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {}}, loader)
    async with pool.acquire("a"):
        unloading = asyncio.create_task(pool.unload("a"))
        await asyncio.sleep(0.05)
        assert state(pool, "a") is ModelState.READY
    await asyncio.wait_for(unloading, 5)
    assert state(pool, "a") is ModelState.ABSENT


async def test_preload_makes_the_pool_ready(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB, "b": MB})
    loader.gate = threading.Event()
    pool = make_pool({"a": {"preload": True}, "b": {}}, loader)
    pool.start()
    await asyncio.sleep(0.05)
    assert not pool.ready and state(pool, "a") is ModelState.LOADING
    loader.gate.set()
    await settle(pool)
    assert pool.ready and state(pool, "b") is ModelState.ABSENT


async def test_a_load_slower_than_the_timeout_is_a_503_and_keeps_going(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    loader.gate = threading.Event()
    pool = make_pool({"a": {}}, loader, load_timeout=0.1)
    with pytest.raises(ServiceUnavailableError, match="not ready") as err:
        await use(pool, "a")
    assert err.value.retry_after
    loader.gate.set()
    await settle(pool)
    assert state(pool, "a") is ModelState.READY and loader.calls == ["a"]


async def test_a_model_bigger_than_its_estimate_evicts_idle_ones_after_loading(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"small": MB, "under": 2 * MB})
    pool = make_pool({"small": {}, "under": {"memory_reserve": MB}}, loader, budget=2 * MB + MB // 2)
    await use(pool, "small")
    await use(pool, "under")  # estimated 1 MiB (fits beside small), measured 2 MiB
    await settle(pool)
    assert state(pool, "small") is ModelState.ABSENT and state(pool, "under") is ModelState.READY
    assert pool.used() <= pool.budget
    assert pool.entries["under"].estimate == MB
    await pool.unload("under")
    await use(pool, "under")  # the next load expects what it measured
    assert pool.entries["under"].estimate >= 2 * MB


async def test_models_that_cannot_fit_together_take_turns_without_livelock(make_pool: PoolFactory) -> None:
    # Regression: a model loaded for waiting requests was evicted by the other model's load before they could
    # lease it, over and over.
    loader = FakeLoader({"a": 2 * MB, "b": 2 * MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB)
    await asyncio.wait_for(asyncio.gather(*(use(pool, name) for _ in range(5) for name in ("a", "b"))), 10)
    assert len(loader.calls) <= 10


async def test_a_model_loaded_without_a_request_starts_its_idle_timer(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {"ttl": 60}}, loader)
    await pool.load("a")
    clock(pool).advance(61)
    await settle(pool)
    assert state(pool, "a") is ModelState.ABSENT


async def test_unload_of_a_model_in_use_past_the_timeout_is_a_503(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {}}, loader, load_timeout=0.1)
    async with pool.acquire("a"):
        with pytest.raises(ServiceUnavailableError, match="still in use by 1 request"):
            await pool.unload("a")
    assert state(pool, "a") is ModelState.READY


async def test_caches_are_trimmed_before_any_model_is_evicted(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB, "b": MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB)
    await use(pool, "a")
    loader.engines["a"].cache_bytes = MB + MB // 2  # a's prompt cache grew
    assert pool.entries["a"].footprint >= 2 * MB + MB // 2  # the cache counts against the budget
    await use(pool, "b")  # b needs about 1 MiB: trimming a's cache frees it
    await settle(pool)
    assert state(pool, "a") is ModelState.READY and state(pool, "b") is ModelState.READY
    assert loader.engines["a"].trims and 0 < loader.engines["a"].cache_bytes < MB
    assert pool.used() <= pool.budget


async def test_a_trim_the_worker_reaches_after_the_models_unload_leaves_the_closed_engine_alone(
    make_pool: PoolFactory,
) -> None:
    """The worker runs the newest job first, so an unload asked for while a trim waits for the worker closes the
    engine before the trim runs (seen in the soak test: a load failed with the closed engine's AttributeError)."""
    loader = FakeLoader({"a": MB})
    pool = make_pool({"a": {}}, loader)
    await use(pool, "a")
    engine = loader.engines["a"]
    engine.cache_bytes = MB
    gate = threading.Event()
    busy = asyncio.ensure_future(pool.worker.call(lambda: gate.wait(5)))
    await asyncio.sleep(0.05)  # the worker is inside the gate job
    trimming = asyncio.ensure_future(pool._trim_caches(MB))
    await asyncio.sleep(0)  # the trim is queued
    unloading = pool._start_unload(pool.entries["a"], "evicted")
    await asyncio.sleep(0)  # and the unload after it
    gate.set()
    await asyncio.gather(busy, trimming, unloading)
    assert engine.closed and not engine.trims
    assert state(pool, "a") is ModelState.ABSENT


async def test_a_model_is_evicted_when_trimming_its_cache_is_not_enough(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB, "b": 2 * MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB)
    await use(pool, "a")
    loader.engines["a"].cache_bytes = MB // 2
    await use(pool, "b")
    await settle(pool)
    assert loader.engines["a"].trims == [0]  # the whole cache went first
    assert state(pool, "a") is ModelState.ABSENT and state(pool, "b") is ModelState.READY


async def test_a_cache_grown_past_the_budget_is_trimmed_when_the_request_ends(make_pool: PoolFactory) -> None:
    loader = FakeLoader({"a": MB, "b": MB})
    pool = make_pool({"a": {}, "b": {}}, loader, budget=3 * MB)
    await use(pool, "b")
    async with pool.acquire("a"):
        loader.engines["a"].cache_bytes = 2 * MB  # grows while serving: now over budget
    await settle(pool)
    while pool.used() > pool.budget:
        await asyncio.sleep(0.005)
    assert state(pool, "b") is ModelState.READY  # trimmed, nothing evicted
    assert loader.engines["a"].trims
