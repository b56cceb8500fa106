"""A model's place in the pool: its state machine and the bookkeeping the pool keeps for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from mlxpool.clock import Timer
from mlxpool.config import ModelSpec
from mlxpool.engines import Engine
from mlxpool.errors import MlxpoolError
from mlxpool.pool.downloads import Progress


class ModelState(StrEnum):
    ABSENT = "absent"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


IN_MEMORY = (ModelState.LOADING, ModelState.READY, ModelState.UNLOADING)


@dataclass(eq=False)
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.ABSENT
    engine: Engine | None = None
    leases: int = 0
    waiters: int = 0
    """Requests waiting for this model to be ready; a model just loaded for them is not evicted before they lease."""
    last_used: float = 0.0
    estimate: int = 0
    """Bytes expected before loading: weight files plus the kind's reserve."""
    measured: int | None = None
    """Bytes MLX allocated while loading, measured on the worker."""
    transition: asyncio.Task[MlxpoolError | None] | None = None
    """The load or unload in flight; every state change after the first goes through it (single flight)."""
    progress: Progress | None = None
    """Bytes done of the download in flight (state `downloading`)."""
    timer: Timer | None = None
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None

    @property
    def footprint(self) -> int:
        """Bytes this model counts against the budget now."""
        if self.state not in IN_MEMORY:
            return 0
        if self.state is ModelState.LOADING or self.measured is None:
            return self.estimate
        # The estimate's reserve stays counted while loaded: it is the model's working memory (activations, KV).
        return max(self.estimate, self.measured + self.cache_bytes)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the engine's growing caches (prompt cache, KV of sequences in flight)."""
        return self.engine.cache_bytes if self.engine is not None and self.state is ModelState.READY else 0

    @property
    def idle(self) -> bool:
        """Loaded, and nobody is using it, waiting for it, or changing its state."""
        return self.state is ModelState.READY and self.leases == 0 and self.waiters == 0 and self.transition is None

    @property
    def evictable(self) -> bool:
        return self.idle and not self.spec.pinned
