"""The chat engine's prompt cache on the tiny Qwen3: a conversation's next turn reuses the KV of the previous
one, answers stay exactly what they are without the cache, and the cache's bytes are counted and trimmable."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlxpool.demo import build_tiny_chat
from mlxpool.engines.chat import ChatEngine
from tests.conftest import Served, ServeFactory, make_settings


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("cache") / "qwen3")


@pytest.fixture
async def served(serve: ServeFactory, tiny_chat: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "cached": {"kind": "chat", "path": str(tiny_chat), "memory_reserve": 0},  # footprint: weights + caches
            "uncached": {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB", "prompt_cache_size": 0},
        }
    )
    async with serve(settings) as s:
        yield s


async def turn(s: Served, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": 10, "temperature": 0, **kwargs}
    response = await s.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def engine(s: Served, name: str) -> ChatEngine:
    chat = s.pool.entries[name].engine
    assert isinstance(chat, ChatEngine)
    return chat


@pytest.mark.parametrize("stream", [False, True])
async def test_the_next_turn_reuses_the_conversation_and_answers_the_same(served: Served, stream: bool) -> None:
    conversation: list[dict[str, Any]] = [{"role": "user", "content": "Hello! How are you today?"}]
    for question in ("Tell me more.", "And then?"):
        cached = await turn(served, "cached", conversation)
        plain = await turn(served, "uncached", conversation)
        assert cached["choices"][0]["message"] == plain["choices"][0]["message"]
        assert cached["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        conversation += [cached["choices"][0]["message"], {"role": "user", "content": question}]
    last = await turn(served, "cached", conversation)
    reused = last["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused > len(conversation)  # most of the earlier turns came from the cache
    assert last["usage"]["prompt_tokens"] > reused
    assert last["choices"][0]["message"] == (await turn(served, "uncached", conversation))["choices"][0]["message"]
    if stream:
        chunks = await served.http.post(
            "/v1/chat/completions",
            json={"model": "cached", "messages": conversation, "max_tokens": 10, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}},
        )  # fmt: skip
        assert '"cached_tokens":' in chunks.text


async def test_the_same_prompt_again_reads_one_token(served: Served) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = await turn(served, "cached", messages)
    again = await turn(served, "cached", messages)
    assert first["choices"][0]["message"] == again["choices"][0]["message"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


async def test_cache_bytes_count_in_the_pool_and_trim_away(served: Served) -> None:
    await turn(served, "cached", [{"role": "user", "content": "Hello!"}])
    chat = engine(served, "cached")
    entry = served.pool.entries["cached"]
    assert chat.cache_bytes > 0 and chat.describe()["prompt_cache_entries"] == 1
    assert entry.footprint == (entry.measured or 0) + chat.cache_bytes
    await served.pool.worker.call(lambda: chat.trim_cache(0))
    assert chat.cache_bytes == 0 and chat.describe()["prompt_cache_entries"] == 0


async def test_what_the_cache_holds_is_what_it_counts(served: Served) -> None:
    """Sequences that finish at different steps leave their KV in the cache as copies: the memory MLX holds
    afterwards is the counted cache bytes, not the batch's whole KV buffers of each of those steps."""

    def active() -> int:
        gc.collect()
        mx.clear_cache()
        return int(mx.get_active_memory())

    await turn(served, "cached", [{"role": "user", "content": "Warm up."}])
    chat = engine(served, "cached")
    await served.pool.worker.call(lambda: chat.trim_cache(0))
    before = await served.pool.worker.call(active)
    story = "Tell me a long story about the sea, the wind and the ships. " * 4
    await asyncio.gather(
        *(
            turn(served, "cached", [{"role": "user", "content": f"{n}. {story}"}], max_tokens=4 + 3 * n)
            for n in range(12)
        )
    )
    held = await served.pool.worker.call(active) - before
    assert chat.describe()["prompt_cache_entries"] == 8
    assert chat.cache_bytes > 0
    assert held <= 1.1 * chat.cache_bytes + 64 * 1024, (held, chat.cache_bytes)
