"""A chat model's warm-up at load, on the tiny Qwen3: it goes through the serving paths, leaves nothing behind,
changes no answer, and a warm-up that fails leaves a model that loads and serves."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mlxpool.config import ModelSpec
from mlxpool.demo import build_tiny_chat
from mlxpool.engines.chat import ChatEngine, load_chat
from mlxpool.engines.warmup import WarmUp, warm_up
from mlxpool.worker import Worker
from tests.conftest import Served, ServeFactory, make_settings


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("warmup") / "qwen3")


def loaded(path: Path, **spec: Any) -> ChatEngine:
    """Run the loader task to its end on this thread (no other work: nothing else calls MLX here)."""
    task = load_chat(ModelSpec(name="tiny", kind="chat", path=str(path), **spec), path, Worker())
    while True:
        try:
            next(task)
        except StopIteration as stop:
            engine: ChatEngine = stop.value
            return engine


def run(task: Any) -> WarmUp:
    while True:
        try:
            next(task)
        except StopIteration as stop:
            done: WarmUp = stop.value
            return done


def test_the_warm_up_takes_every_serving_path_and_leaves_the_engine_as_it_was(tiny_chat: Path) -> None:
    engine = loaded(tiny_chat, warmup=False)
    done = run(warm_up(engine))
    assert done.alone == 2  # the first sequence, and the second from its cached prefix
    assert done.handoffs == 1  # the second handed to the batch when two more came
    assert done.cached_tokens > 0
    assert done.joins >= 2  # a group formed the batch, and another joined it while it ran
    assert done.tokens >= 10 and done.steps > 5
    assert engine.describe() == {
        "active_sequences": 0, "queued_sequences": 0, "steps": 0, "generated_tokens": 0, "cached_tokens": 0,
        "sequences_alone": 0, "handoffs": 0, "prompt_cache_entries": 0, "cache_bytes": 0,
    }  # fmt: skip
    assert len(engine.generator) == 0 and engine._solo is None


def test_a_loaded_model_has_warmed_up_unless_told_not_to(tiny_chat: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mlxpool.engines.chat")
    loaded(tiny_chat, warmup=False)
    assert "warmed up" not in caplog.text
    loaded(tiny_chat)
    assert "model 'tiny' warmed up" in caplog.text


@pytest.fixture
async def served(serve: ServeFactory, tiny_chat: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "warm": {"kind": "chat", "path": str(tiny_chat), "preload": True},
            "cold": {"kind": "chat", "path": str(tiny_chat), "preload": True, "warmup": False},
        }
    )
    async with serve(settings) as s:
        await s.wait_ready()
        yield s


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}])
async def test_answers_after_a_warm_up_are_the_answers_without_one(served: Served, sampling: dict[str, Any]) -> None:
    answers = []
    for model in ("warm", "cold"):
        body = {"model": model, "messages": [{"role": "user", "content": "Hi there!"}], "max_tokens": 12, **sampling}
        response = await served.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    assert answers[0]


async def test_a_warm_up_that_fails_leaves_a_model_that_serves(
    serve: ServeFactory, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    admit = ChatEngine._admit

    def fails_for_the_warm_up(engine: ChatEngine) -> None:
        if any(s.loop is None for s in engine._incoming):
            raise RuntimeError("boom")
        admit(engine)

    monkeypatch.setattr(ChatEngine, "_admit", fails_for_the_warm_up)
    settings = make_settings({"chat": {"kind": "chat", "path": str(tiny_chat), "preload": True}})
    async with serve(settings) as s:
        await s.wait_ready()
        assert "model 'chat': warm-up failed" in caplog.text
        engine = s.pool.entries["chat"].engine
        assert isinstance(engine, ChatEngine) and engine.describe()["queued_sequences"] == 0
        body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        response = await s.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
