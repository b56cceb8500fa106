"""The admin API: what the pool holds, and loading or unloading a model by hand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.pool import ModelEntry, ModelPool


def describe(entry: ModelEntry, now: float) -> dict[str, Any]:
    spec = entry.spec
    return {
        "name": spec.name,
        "kind": spec.kind,
        "state": entry.state,
        "source": spec.source,
        "aliases": spec.aliases,
        "default": spec.default,
        "preload": spec.preload,
        "pinned": spec.pinned,
        "ttl": spec.ttl,
        "leases": entry.leases,
        "waiting": entry.waiters,
        "idle_seconds": round(now - entry.last_used, 1) if entry.last_used else None,
        "estimated_bytes": entry.estimate or None,
        "measured_bytes": entry.measured,
        "memory_bytes": entry.footprint,
        "failures": entry.failures,
        "error": entry.error,
        "retry_in": round(max(0.0, entry.retry_at - now), 1) if entry.state == "failed" else None,
        "download": entry.progress.as_dict() if entry.progress is not None else None,
        "engine": entry.engine.describe() if entry.engine is not None else None,
    }


def resident_bytes() -> int | None:
    """This process's resident memory (Linux: /proc; elsewhere None)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def pool_status(pool: ModelPool) -> dict[str, Any]:
    now = pool.clock.now()
    return {
        "budget_bytes": pool.budget,
        "used_bytes": pool.used(),
        "active_memory_bytes": pool.worker.active_memory,
        "baseline_memory_bytes": pool.worker.baseline_memory,
        "rss_bytes": resident_bytes(),
        "worker_steps": pool.worker.steps,
        "ready": pool.ready,
        "models": [describe(entry, now) for entry in pool.entries.values()],
    }


async def list_pool(request: Request) -> Response:
    return JSONResponse(pool_status(request.app.state.pool))


async def load_model(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    entry = await pool.load(request.path_params["name"])
    return JSONResponse(describe(entry, pool.clock.now()))


async def unload_model(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    entry = await pool.unload(request.path_params["name"])
    return JSONResponse(describe(entry, pool.clock.now()))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    waiting = {e.spec.name: e.state for e in pool.entries.values() if e.spec.preload and e.state != "ready"}
    if not waiting:
        return JSONResponse({"status": "ready"})
    message = "preloading: " + ", ".join(f"{name} ({state})" for name, state in waiting.items())
    error = {"message": message, "type": "server_error", "param": None, "code": "not_ready"}
    return JSONResponse({"status": "starting", "waiting": waiting, "error": error}, 503)
