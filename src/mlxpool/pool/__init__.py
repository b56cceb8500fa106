"""The model pool: registry, states, leases, budget, eviction, timers."""

from mlxpool.pool.pool import ModelPool
from mlxpool.pool.state import ModelEntry, ModelState

__all__ = ["ModelEntry", "ModelPool", "ModelState"]
