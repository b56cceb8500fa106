"""What the server measures: `GET /metrics` for Prometheus, and the recent requests the status page shows.

Each app has a registry of its own (tests build many apps). Request counts and latencies are recorded by
`Metrics.record`, which the request observer of api/access.py calls; tokens by the routes (`count_tokens`); the
pool's figures are read when Prometheus scrapes (`PoolCollector`), so nothing in `pool/` knows about Prometheus.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import Scope

from mlxpool.pool import ModelPool, ModelState
from mlxpool.pool.stats import DURATION_BOUNDS, Durations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Request latency buckets, in seconds: embeddings take milliseconds, long generations minutes."""
RECENT_REQUESTS = 50
QUIET_ROUTES = {"/", "/metrics", "/health", "/health/ready", "/admin/models", "/admin/requests"}
"""Routes polled by dashboards and probes: counted in the metrics, left out of the recent requests."""
UNMATCHED = "other"
"""The route label of paths that match no route (404s), so stray paths cannot add label values."""
QUEUED_KEYS = ("queued_sequences", "queued_requests")
ACTIVE_KEYS = ("active_sequences", "active_requests")


class Metrics:
    """One app's metrics: its registry, the request and token counters, and the last requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pool: ModelPool | None = None
        """Set once the lifespan has built the pool; the collector reports nothing before."""
        self.requests = Counter(
            "mlxpool_requests",
            "HTTP requests answered, by route template, method, model and status code.",
            ["route", "method", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlxpool_request_duration_seconds",
            "Time from a request's arrival to the end of its response (the whole stream for streaming responses).",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mlxpool_prompt_tokens", "Prompt (input) tokens read, by model.", ["model"], registry=self.registry
        )
        self.generated_tokens = Counter(
            "mlxpool_generated_tokens", "Completion tokens generated, by model.", ["model"], registry=self.registry
        )
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.registry.register(PoolCollector(lambda: self.pool))

    def record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        """A finished request (api/access.py's `RequestObserver` calls it): by route template, model and status."""
        self.observe(scope, route_template(scope), state.get("model") or "", status, seconds)

    def observe(self, scope: Scope, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, scope["method"], model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)
        if route not in QUIET_ROUTES:
            self.recent.append(
                {
                    "time": round(time.time(), 3),
                    "method": scope["method"],
                    "path": scope["path"],
                    "model": model or None,
                    "status": status,
                    "seconds": round(seconds, 4),
                }
            )


def count_tokens(request: Request, model: str, usage: dict[str, Any]) -> None:
    """Count a response's `usage` (prompt and completion tokens) for `model`."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
        metrics.generated_tokens.labels(model).inc(usage.get("completion_tokens", 0))


def route_template(scope: Scope) -> str:
    """The path template of the route that took (or would take) this request."""
    route = scope.get("route")
    if route is None:  # answered before routing (401, 413, CORS preflight): match it here
        app = scope.get("app")
        routes = app.router.routes if app is not None else []
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class PoolCollector(Collector):
    """The pool's figures, read at scrape time: states, memory, queues, loads and unloads."""

    def __init__(self, pool: Callable[[], ModelPool | None]):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool()
        if pool is None:
            return
        yield from _memory(pool)
        yield from _models(pool)
        yield from _transitions(pool)


def _memory(pool: ModelPool) -> Iterator[Metric]:
    used = pool.used()
    yield GaugeMetricFamily("mlxpool_memory_budget_bytes", "The pool's memory budget.", value=pool.budget)
    yield GaugeMetricFamily("mlxpool_memory_used_bytes", "Bytes counted against the budget.", value=used)
    yield GaugeMetricFamily("mlxpool_memory_free_bytes", "Budget not in use.", value=max(0, pool.budget - used))
    active = GaugeMetricFamily("mlxpool_mlx_active_memory_bytes", "MLX active memory, as the worker last saw it.")
    active.add_metric([], pool.worker.active_memory)
    yield active


def _models(pool: ModelPool) -> Iterator[Metric]:
    state = GaugeMetricFamily("mlxpool_model_state", "1 for the state each model is in.", labels=["model", "state"])
    memory = GaugeMetricFamily(
        "mlxpool_model_memory_bytes", "Bytes each model counts against the budget.", labels=["model"]
    )
    leases = GaugeMetricFamily("mlxpool_model_leases", "Requests holding each model.", labels=["model"])
    waiting = GaugeMetricFamily(
        "mlxpool_model_waiting_requests", "Requests waiting for each model to be ready.", labels=["model"]
    )
    queued = GaugeMetricFamily("mlxpool_queue_depth", "Work queued in each model's engine.", labels=["model"])
    active = GaugeMetricFamily("mlxpool_active_sequences", "Work each model's engine is running.", labels=["model"])
    for name, entry in pool.entries.items():
        for value in ModelState:
            state.add_metric([name, value.value], 1 if entry.state is value else 0)
        memory.add_metric([name], entry.footprint)
        leases.add_metric([name], entry.leases)
        waiting.add_metric([name], entry.waiters)
        figures = entry.engine.describe() if entry.engine is not None else {}
        queued.add_metric([name], sum(figures.get(key, 0) for key in QUEUED_KEYS))
        active.add_metric([name], sum(figures.get(key, 0) for key in ACTIVE_KEYS))
    yield from (state, memory, leases, waiting, queued, active)


def _transitions(pool: ModelPool) -> Iterator[Metric]:
    loads = CounterMetricFamily("mlxpool_model_loads", "Loads that finished, by model.", labels=["model"])
    failures = CounterMetricFamily("mlxpool_model_load_failures", "Loads that failed, by model.", labels=["model"])
    unloads = CounterMetricFamily(
        "mlxpool_model_unloads", "Unloads by model and reason (idle, evicted, requested).", labels=["model", "reason"]
    )
    evictions = CounterMetricFamily("mlxpool_model_evictions", "Models evicted to free memory.", labels=["model"])
    load_seconds = HistogramMetricFamily(
        "mlxpool_model_load_duration_seconds", "Time to load a model (downloads excluded).", labels=["model"]
    )
    unload_seconds = HistogramMetricFamily(
        "mlxpool_model_unload_duration_seconds", "Time to unload a model, by reason.", labels=["model", "reason"]
    )
    for name, stats in pool.stats.models.items():
        loads.add_metric([name], stats.loads)
        failures.add_metric([name], stats.load_failures)
        evictions.add_metric([name], stats.unloads.get("evicted", 0))
        load_seconds.add_metric([name], _buckets(stats.load_seconds), stats.load_seconds.total)
        for reason, count in stats.unloads.items():
            unloads.add_metric([name, reason], count)
            durations = stats.unload_seconds[reason]
            unload_seconds.add_metric([name, reason], _buckets(durations), durations.total)
    yield from (loads, failures, unloads, evictions, load_seconds, unload_seconds)


def _buckets(durations: Durations) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, as Prometheus histograms have them."""
    cumulative, total = [], 0
    for bound, count in zip([*map(str, DURATION_BOUNDS), "+Inf"], durations.counts, strict=True):
        total += count
        cumulative.append((bound, float(total)))
    return cumulative


async def scrape(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_requests(request: Request) -> Response:
    """The last requests (newest first), for the status page; probes and dashboard polls left out."""
    metrics: Metrics = request.app.state.metrics
    return JSONResponse({"requests": list(reversed(metrics.recent))})
