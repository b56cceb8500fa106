"""Models, admin, health and error shapes, over fake engines so the pool's states are under the test's control."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import FakeLoader

MB = 2**20


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader({"emb": MB, "asr": MB, "big": MB})


@pytest.fixture
async def served(serve: ServeFactory, loader: FakeLoader, tmp_path: Path) -> AsyncIterator[Served]:
    common = {"path": str(tmp_path), "memory_reserve": MB}
    settings = make_settings(
        {
            "emb": {"kind": "embedding", "aliases": ["embedding"], "preload": True, **common},
            "asr": {"kind": "asr", "repo": None, "aliases": ["asr"], **common},
            "big": {"kind": "embedding", "path": str(tmp_path), "memory_reserve": "1TB"},
        },
        load_timeout=0.3,
    )
    loader.gate = threading.Event()
    async with serve(settings, loader=loader) as s:
        yield s


async def test_ready_waits_for_preloads(served: Served, loader: FakeLoader) -> None:
    assert (await served.http.get("/health")).json() == {"status": "ok"}
    starting = await served.http.get("/health/ready")
    assert starting.status_code == 503 and list(starting.json()["waiting"]) == ["emb"]
    assert loader.gate is not None
    loader.gate.set()
    await served.wait_ready()
    assert (await served.http.get("/health/ready")).json() == {"status": "ready"}


@pytest.mark.parametrize("prefix", ["/v1", ""])
async def test_models_list_and_lookup_by_name_alias_and_openai_name(served: Served, prefix: str) -> None:
    listing = (await served.http.get(f"{prefix}/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["emb", "asr", "big"]
    for name in ("emb", "embedding", "text-embedding-3-small"):
        card = (await served.http.get(f"{prefix}/models/{name}")).json()
        assert card["id"] == "emb" and card["object"] == "model" and card["kind"] == "embedding"
    assert (await served.http.get(f"{prefix}/models/whisper-1")).json()["id"] == "asr"


async def test_openai_client_lists_models(served: Served) -> None:
    page = await served.openai.models.list()
    assert [m.id for m in page.data] == ["emb", "asr", "big"]
    assert (await served.openai.models.retrieve("embedding")).id == "emb"


async def test_repo_ids_with_a_slash_resolve(serve: ServeFactory, tmp_path: Path) -> None:
    settings = make_settings({"m": {"kind": "embedding", "repo": "org/some-model"}})
    async with serve(settings, loader=FakeLoader({})) as s:
        card = await s.http.get("/v1/models/org/some-model")
        assert card.status_code == 200 and card.json()["id"] == "m"


async def test_unknown_model_and_route_are_openai_404s(served: Served) -> None:
    missing = await served.http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    route = await served.http.get("/v1/nothing-here")
    assert route.status_code == 404 and route.json()["error"]["type"] == "invalid_request_error"
    method = await served.http.delete("/v1/embeddings")
    assert method.status_code == 405 and "error" in method.json()


async def test_wrong_kind_for_the_route_is_a_400(served: Served) -> None:
    response = await served.http.post("/v1/embeddings", json={"model": "asr", "input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported" and "asr" in response.json()["error"]["message"]


async def test_admin_loads_lists_and_unloads(served: Served, loader: FakeLoader) -> None:
    assert loader.gate is not None
    loader.gate.set()
    loaded = await served.http.post("/admin/models/asr/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    status = (await served.http.get("/admin/models")).json()
    asr = next(m for m in status["models"] if m["name"] == "asr")
    assert asr["measured_bytes"] >= MB and asr["estimated_bytes"] == MB and asr["leases"] == 0
    assert status["budget_bytes"] > 0 and status["used_bytes"] >= MB
    assert asr["engine"] == {"pending": 0}
    unloaded = await served.http.post("/admin/models/asr/unload")
    assert unloaded.json()["state"] == "absent"


async def test_a_load_that_is_too_slow_is_a_503_with_retry_after(served: Served) -> None:
    response = await served.http.post("/admin/models/asr/load")  # the gate holds every load
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "server_error"


async def test_a_model_larger_than_the_budget_is_a_503(served: Served) -> None:
    response = await served.http.post("/v1/embeddings", json={"model": "big", "input": "hi"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_too_large"
    assert "retry-after" in response.headers


async def test_a_failing_model_is_a_503_and_the_server_goes_on(serve: ServeFactory, tmp_path: Path) -> None:
    loader = FakeLoader({"bad": MB, "good": MB}, fail={"bad"})
    settings = make_settings(
        {name: {"kind": "embedding", "path": str(tmp_path), "memory_reserve": MB} for name in ("bad", "good")}
    )
    async with serve(settings, loader=loader) as s:
        failed = await s.http.post("/admin/models/bad/load")
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_load_failed"
        assert "cannot load bad" in failed.json()["error"]["message"]
        again = await s.http.post("/admin/models/bad/load")
        assert again.status_code == 503 and "retrying in" in again.json()["error"]["message"]
        assert (await s.http.post("/admin/models/good/load")).status_code == 200
        status = (await s.http.get("/admin/models")).json()
        bad = next(m for m in status["models"] if m["name"] == "bad")
        assert bad["state"] == "failed" and bad["failures"] == 1 and bad["retry_in"] > 0


async def test_a_directory_without_a_model_fails_to_load_clearly(serve: ServeFactory, tmp_path: Path) -> None:
    settings = make_settings({"speech": {"kind": "tts", "path": str(tmp_path)}})
    async with serve(settings) as s:
        response = await s.http.post("/admin/models/speech/load")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_load_failed"
        assert "'speech' failed to load" in response.json()["error"]["message"]


async def test_missing_local_path_is_a_load_failure(serve: ServeFactory, tmp_path: Path) -> None:
    settings = make_settings({"m": {"kind": "embedding", "path": str(tmp_path / "absent")}})
    async with serve(settings) as s:
        response = await s.http.post("/v1/embeddings", json={"model": "m", "input": "hi"})
        assert response.status_code == 503 and "is not a directory" in response.json()["error"]["message"]


async def test_concurrent_admin_loads_are_single_flight(served: Served, loader: FakeLoader) -> None:
    assert loader.gate is not None
    loader.gate.set()
    responses = await asyncio.gather(*(served.http.post("/admin/models/asr/load") for _ in range(8)))
    assert {r.status_code for r in responses} == {200}
    assert loader.calls.count("asr") == 1


@pytest.mark.parametrize(("cudnn", "value"), [(False, "0"), (True, "1")])
async def test_the_server_tells_mlx_which_cuda_attention_to_use(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch, cudnn: bool, value: str
) -> None:
    monkeypatch.delenv("MLX_CUDA_USE_CUDNN_SDPA", raising=False)
    async with serve(make_settings({}, cudnn_attention=cudnn), loader=FakeLoader({})):
        assert os.environ["MLX_CUDA_USE_CUDNN_SDPA"] == value


async def test_the_server_holds_the_gil_switch_interval_it_is_set_to_while_it_serves(serve: ServeFactory) -> None:
    before = sys.getswitchinterval()
    async with serve(make_settings({}, gil_switch_interval=0.002), loader=FakeLoader({})):
        assert sys.getswitchinterval() == pytest.approx(0.002)
    assert sys.getswitchinterval() == pytest.approx(before)
