"""GET /metrics: it parses as Prometheus text, and its figures move with requests, loads and evictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from mlxpool.api.access import RequestObserver
from mlxpool.api.metrics import Metrics
from mlxpool.demo import build_tiny_chat
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import FakeLoader

MB = 2**20


class Scrape:
    """One scrape, parsed with prometheus_client's own parser: `scrape.value(name, **labels)`."""

    def __init__(self, text: str):
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())


async def scrape(s: Served) -> Scrape:
    response = await s.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def fake_models(tmp_path: Path, **extra: Any) -> dict[str, dict[str, Any]]:
    common = {"kind": "embedding", "path": str(tmp_path), "memory_reserve": 2 * MB, **extra}
    return {"a": dict(common), "b": dict(common)}


async def test_requests_are_counted_by_route_template_and_status(serve: ServeFactory, tmp_path: Path) -> None:
    async with serve(make_settings(fake_models(tmp_path)), loader=FakeLoader({})) as s:
        before = await scrape(s)
        for name in ("a", "b", "nope"):
            await s.http.get(f"/v1/models/{name}")
        await s.http.get("/no/such/path")
        after = await scrape(s)
    route = "/v1/models/{model:path}"
    assert before.value("mlxpool_requests_total", route=route) == 0
    assert after.value("mlxpool_requests_total", route=route, method="GET", status="200") == 2
    assert after.value("mlxpool_requests_total", route=route, status="404") == 1
    assert after.value("mlxpool_requests_total", route="other", status="404") == 1
    assert after.value("mlxpool_request_duration_seconds_count", route=route) == 3
    assert after.value("mlxpool_request_duration_seconds_sum", route=route) > 0
    assert not any(s.labels.get("route") == "/v1/models/a" for s in after.samples)  # templates, not raw paths
    assert after.value("mlxpool_requests_total", route="/metrics") == 1  # the first scrape


async def test_pool_figures_follow_loads_unloads_and_evictions(serve: ServeFactory, tmp_path: Path) -> None:
    settings = make_settings(fake_models(tmp_path), memory_budget="3MiB")  # room for one model at a time
    async with serve(settings, loader=FakeLoader({"a": MB, "b": MB})) as s:
        empty = await scrape(s)
        assert empty.value("mlxpool_memory_budget_bytes") == 3 * MB
        assert empty.value("mlxpool_memory_used_bytes") == 0 and empty.value("mlxpool_memory_free_bytes") == 3 * MB
        assert empty.value("mlxpool_model_state", model="a", state="absent") == 1
        assert (await s.http.post("/admin/models/a/load")).status_code == 200
        loaded = await scrape(s)
        assert loaded.value("mlxpool_model_state", model="a", state="ready") == 1
        assert loaded.value("mlxpool_model_state", model="a") == 1  # one state at a time
        footprint = loaded.value("mlxpool_model_memory_bytes", model="a")
        assert footprint >= MB and loaded.value("mlxpool_memory_used_bytes") == footprint
        assert loaded.value("mlxpool_memory_free_bytes") == 3 * MB - footprint
        assert loaded.value("mlxpool_model_loads_total", model="a") == 1
        assert loaded.value("mlxpool_model_load_duration_seconds_count", model="a") == 1
        assert loaded.value("mlxpool_model_load_duration_seconds_bucket", model="a", le="+Inf") == 1
        assert (await s.http.post("/admin/models/b/load")).status_code == 200  # evicts a
        assert (await s.http.post("/admin/models/b/unload")).status_code == 200
        after = await scrape(s)
    assert after.value("mlxpool_model_evictions_total", model="a") == 1
    assert after.value("mlxpool_model_unloads_total", model="a", reason="evicted") == 1
    assert after.value("mlxpool_model_unloads_total", model="b", reason="requested") == 1
    assert after.value("mlxpool_model_unload_duration_seconds_count", model="b", reason="requested") == 1
    assert after.value("mlxpool_model_state", model="b", state="absent") == 1
    assert after.value("mlxpool_memory_used_bytes") == 0


async def test_failed_loads_and_queue_depth(
    serve: ServeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = FakeLoader({"a": MB}, fail={"b"})
    async with serve(make_settings(fake_models(tmp_path)), loader=loader) as s:
        assert (await s.http.post("/admin/models/b/load")).status_code == 503
        assert (await s.http.post("/admin/models/a/load")).status_code == 200
        monkeypatch.setattr(loader.engines["a"], "describe", lambda: {"queued_sequences": 3, "active_sequences": 2})
        figures = await scrape(s)
    assert figures.value("mlxpool_model_load_failures_total", model="b") == 1
    assert figures.value("mlxpool_model_state", model="b", state="failed") == 1
    assert figures.value("mlxpool_queue_depth", model="a") == 3
    assert figures.value("mlxpool_active_sequences", model="a") == 2
    assert figures.value("mlxpool_model_leases", model="a") == 0


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("metrics-chat") / "qwen3")


async def test_tokens_are_counted_for_embeddings_and_chat(
    serve: ServeFactory, tiny_models: dict[str, Path], tiny_chat: Path
) -> None:
    settings = make_settings(
        {
            "bert": {"kind": "embedding", "path": str(tiny_models["bert"]), "memory_reserve": "16MB"},
            "chat": {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB"},
        }
    )
    async with serve(settings) as s:
        embedded = await s.openai.embeddings.create(model="bert", input=["hello there", "world"])
        answer = await s.openai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        stream = await s.openai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, stream=True
        )
        async for _ in stream:
            pass
        figures = await scrape(s)
    assert answer.usage is not None
    assert figures.value("mlxpool_prompt_tokens_total", model="bert") == embedded.usage.prompt_tokens
    assert figures.value("mlxpool_generated_tokens_total", model="bert") == 0
    assert figures.value("mlxpool_generated_tokens_total", model="chat") == answer.usage.completion_tokens + 3
    assert figures.value("mlxpool_prompt_tokens_total", model="chat") == 2 * answer.usage.prompt_tokens
    route = "/v1/chat/completions"
    assert figures.value("mlxpool_request_duration_seconds_count", route=route, model="chat") == 2
    assert figures.value("mlxpool_requests_total", route="/v1/embeddings", model="bert", status="200") == 1


async def test_recent_requests_skip_polls_and_probes(serve: ServeFactory, tmp_path: Path) -> None:
    async with serve(make_settings(fake_models(tmp_path)), loader=FakeLoader({})) as s:
        await s.http.get("/health")
        await s.http.get("/admin/models")
        await s.http.get("/v1/models")
        await s.http.post("/admin/models/nope/load")
        recent = (await s.http.get("/admin/requests")).json()["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in recent] == [
        ("POST", "/admin/models/nope/load", 404),
        ("GET", "/v1/models", 200),
    ]
    assert all(r["seconds"] >= 0 and r["time"] > 0 for r in recent)


async def test_the_model_label_is_what_the_route_put_in_request_state() -> None:
    async def answer(request: Request) -> Response:
        request.state.model = "chosen-model"
        return PlainTextResponse("ok")

    metrics = Metrics()
    app = Starlette(
        routes=[Route("/x/{id}", answer)], middleware=[Middleware(RequestObserver, records=[metrics.record])]
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        await http.get("/x/1")
    figures = Scrape(generate_latest(metrics.registry).decode())
    assert figures.value("mlxpool_requests_total", route="/x/{id}", model="chosen-model", status="200") == 1
    assert metrics.recent[0]["model"] == "chosen-model"
