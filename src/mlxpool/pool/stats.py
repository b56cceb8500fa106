"""Counters the pool keeps about its own work (loads, unloads, evictions and how long they took).

Plain numbers, no metrics library: `api/metrics.py` reads them when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

UnloadReason = Literal["idle", "evicted", "requested"]
"""Why a model left memory: its `ttl` ran out, the pool needed the memory, or someone asked (admin API)."""

DURATION_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds, in seconds, of the duration histograms' buckets (the last bucket is everything above)."""


@dataclass
class Durations:
    """A histogram of durations: how many fell in each bucket of `DURATION_BOUNDS`, and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1
        self.total += seconds


@dataclass
class ModelStats:
    loads: int = 0
    """Loads that finished (the model became ready)."""
    load_failures: int = 0
    load_seconds: Durations = field(default_factory=Durations)
    """Time on the worker from the start of a load to the model being ready (downloads not included)."""
    unloads: dict[UnloadReason, int] = field(default_factory=lambda: defaultdict(int))
    unload_seconds: dict[UnloadReason, Durations] = field(default_factory=lambda: defaultdict(Durations))


@dataclass
class PoolStats:
    models: dict[str, ModelStats] = field(default_factory=lambda: defaultdict(ModelStats))

    def loaded(self, model: str, seconds: float) -> None:
        stats = self.models[model]
        stats.loads += 1
        stats.load_seconds.observe(seconds)

    def failed(self, model: str) -> None:
        self.models[model].load_failures += 1

    def unloaded(self, model: str, reason: UnloadReason, seconds: float) -> None:
        stats = self.models[model]
        stats.unloads[reason] += 1
        stats.unload_seconds[reason].observe(seconds)
