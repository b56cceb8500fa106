"""What the pool needs from an engine, and how engines are loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mlxpool.config import ModelSpec
from mlxpool.worker import Task, Worker


class Engine(Protocol):
    """One loaded model. `has_work`/`step` run on the worker; `close` drops the weights (worker too)."""

    cache_bytes: int
    """Bytes of caches that grow with use (prompt/KV caches), published by the worker; read on the loop."""

    def trim_cache(self, max_bytes: int) -> None:
        """Shrink the caches to at most `max_bytes` (worker)."""
        ...

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Live figures for the admin API (queue depth...); read on the loop, so plain attributes only."""
        ...


Loader = Callable[[ModelSpec, Path, Worker], Task[Engine]]
"""A generator task, run on the worker, that loads a model a slice at a time and returns its engine."""
