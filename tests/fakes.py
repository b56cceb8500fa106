"""Test doubles: a clock the test advances, and engines whose loads allocate real MLX memory of a given size."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxpool.config import ModelSpec
from mlxpool.worker import Task, Worker


def slow_load(spec: ModelSpec, path: Path, worker: Worker) -> Task[Any]:
    """The real loader after five 30 ms steps: long enough for a waiting stream to get `: loading` comments."""
    from mlxpool.engines import load_engine

    for _ in range(5):
        time.sleep(0.03)
        yield
    return (yield from load_engine(spec, path, worker))


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time moves only when the test calls `advance`; due callbacks run then, in order."""

    def __init__(self) -> None:
        self.time = 1000.0
        self._due: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._due, (self.time + delay, next(self._order), timer, callback))
        return timer

    def advance(self, seconds: float) -> None:
        self.time += seconds
        while self._due and self._due[0][0] <= self.time:
            _, _, timer, callback = heapq.heappop(self._due)
            if not timer.cancelled:
                callback()


@dataclass(eq=False)
class FakeEngine:
    name: str
    weights: mx.array | None
    steps: list[str] = field(default_factory=list)
    pending: int = 0
    closed: bool = False
    threads: set[str] = field(default_factory=set)
    cache_bytes: int = 0
    trims: list[int] = field(default_factory=list)

    def has_work(self) -> bool:
        return self.pending > 0

    def trim_cache(self, max_bytes: int) -> None:
        if self.closed:  # as a real engine, whose close() drops its caches
            raise AttributeError("a closed engine has no cache")
        self.trims.append(max_bytes)
        self.cache_bytes = min(self.cache_bytes, max_bytes)

    def step(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.pending -= 1
        self.steps.append(self.name)

    def close(self) -> None:
        self.closed = True
        self.weights = None

    def describe(self) -> dict[str, Any]:
        return {"pending": self.pending}


class FakeLoader:
    """Loads `FakeEngine`s whose weights are real MLX arrays of `sizes[name]` bytes (so memory is measurable).

    `fail` names models whose load raises; `gate` (a threading.Event) holds loads until the test sets it.
    """

    def __init__(self, sizes: dict[str, int], fail: set[str] | None = None, slices: int = 1):
        self.sizes = sizes
        self.fail = fail or set()
        self.slices = slices
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.engines: dict[str, FakeEngine] = {}

    def __call__(self, spec: ModelSpec, path: Path, worker: Worker) -> Task[FakeEngine]:
        self.calls.append(spec.name)
        return self._load(spec)

    def _load(self, spec: ModelSpec) -> Task[FakeEngine]:
        self.threads.add(threading.current_thread().name)
        while self.gate is not None and not self.gate.is_set():
            yield
        if spec.name in self.fail:
            raise RuntimeError(f"cannot load {spec.name}")
        parts = []
        for _ in range(self.slices):
            part = mx.ones((self.sizes.get(spec.name, 4096) // 4 // self.slices,), dtype=mx.float32)
            mx.eval(part)
            parts.append(part)
            yield
        engine = FakeEngine(spec.name, mx.concatenate(parts) if len(parts) > 1 else parts[0])
        self.engines[spec.name] = engine
        return engine
