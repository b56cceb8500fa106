"""A sequence alone decodes outside the batch and joins it when another arrives: the answers must be exactly
what the batch alone gives (greedy), across a hand-off, with penalties, grammars and chunked prompts."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mlxpool.demo import build_tiny_chat
from mlxpool.engines.chat import ADMITS_PER_STEP, ChatEngine, SamplingParams
from tests.conftest import Served, ServeFactory, make_settings

LONG = "Tell me a long story about the sea, the wind, the ships and the people who sail them. " * 3


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("solo") / "qwen3")


@pytest.fixture
async def served(serve: ServeFactory, tiny_chat: Path) -> AsyncIterator[Served]:
    spec = {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB", "prefill_step_size": 16}
    async with serve(make_settings({"alone": spec, "batched": {**spec, "prompt_cache_size": 0}})) as s:
        await s.pool.load("alone")
        await s.pool.load("batched")
        engine(s, "batched").decodes_alone = False  # the reference: always in the batch
        yield s


def engine(s: Served, name: str) -> ChatEngine:
    chat = s.pool.entries[name].engine
    assert isinstance(chat, ChatEngine)
    return chat


async def answer(s: Served, model: str, content: str, **kwargs: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **kwargs}
    response = await s.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def text(response: dict[str, Any]) -> str:
    return str(response["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"repetition_penalty": 1.3, "presence_penalty": 0.5}, {"logprobs": True, "top_logprobs": 2}],
)
async def test_alone_answers_like_the_batch(served: Served, kwargs: dict[str, Any]) -> None:
    for content in ("Hello!", LONG):  # LONG is read 16 tokens per step
        alone = await answer(served, "alone", content, max_tokens=24, **kwargs)
        batched = await answer(served, "batched", content, max_tokens=24, **kwargs)
        assert alone["choices"] == batched["choices"]
        assert alone["usage"]["completion_tokens"] == batched["usage"]["completion_tokens"] == 24
    assert engine(served, "alone").alone >= 2 and engine(served, "alone").handoffs == 0


async def test_a_newcomer_moves_the_lone_sequence_into_the_batch_unchanged(served: Served) -> None:
    reference = text(await answer(served, "batched", LONG, max_tokens=40))
    chat = engine(served, "alone")

    async def newcomer() -> dict[str, Any]:
        while chat.generated_tokens < 10:  # the first sequence is decoding alone by now
            await asyncio.sleep(0.001)
        return await answer(served, "alone", "Hello!", max_tokens=5)

    first, second = await asyncio.gather(answer(served, "alone", LONG, max_tokens=40), newcomer())
    assert chat.handoffs == 1
    assert text(first) == reference and first["usage"]["completion_tokens"] == 40
    assert second["usage"]["completion_tokens"] == 5


async def test_a_grammar_survives_the_hand_off(served: Served) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 12}},
              "required": ["n", "s"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    chat = engine(served, "alone")

    async def newcomer() -> None:
        while chat.generated_tokens < 3:
            await asyncio.sleep(0.001)
        await answer(served, "alone", "Hello!", max_tokens=3)

    result, _ = await asyncio.gather(
        answer(served, "alone", "JSON please", max_tokens=60, response_format=response_format, temperature=0.8, seed=3),
        newcomer(),
    )
    assert chat.handoffs == 1
    value = json.loads(text(result))
    assert set(value) == {"n", "s"} and isinstance(value["n"], int)


async def test_a_client_that_leaves_a_lone_sequence_frees_the_engine(served: Served) -> None:
    chat = engine(served, "alone")
    stream = chat.generate(chat.tokenizer.encode("hello"), SamplingParams(max_tokens=400))
    await anext(stream)
    assert chat._solo is not None
    await stream.aclose()  # what a disconnect does to the route's generator
    while chat.has_work():
        await asyncio.sleep(0.005)
    assert chat.generated_tokens < 100 and chat._solo is None
    assert text(await answer(served, "alone", "Hello!", max_tokens=3))  # and it goes on


async def test_the_batch_reads_new_prompts_in_groups_of_prefill_batch_size(
    serve: ServeFactory, tiny_chat: Path
) -> None:
    spec = {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB"}
    async with serve(make_settings({"default": spec, "wide": {**spec, "prefill_batch_size": 48}})) as s:
        for name, size in (("default", 32), ("wide", 48)):
            await s.pool.load(name)
            assert engine(s, name).generator.group_size == size


async def test_a_step_posts_all_its_deltas_to_the_loop_at_once(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """One wake-up of the event loop per worker step, however many sequences produced a token in it."""
    chat = engine(served, "batched")
    loop = asyncio.get_running_loop()
    posts: list[int] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        if getattr(callback, "__name__", "") == "_put_all":
            posts.append(len(args[0]))
        return original(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    steps_before = chat.steps
    prompts = [f"Count to {n}, slowly." for n in range(8)]
    answers = await asyncio.gather(*(answer(served, "batched", p, max_tokens=12) for p in prompts))
    assert all(a["usage"]["completion_tokens"] == 12 for a in answers)
    assert sum(posts) >= 8 * 12  # every token's delta went through a post (text held back goes with the next)
    assert len(posts) <= chat.steps - steps_before  # never more than one post per step
    assert max(posts) > 1  # and the steps with several sequences posted them together


async def test_a_backlog_joins_in_whole_groups_once_the_previous_group_has_read(
    serve: ServeFactory, tiny_chat: Path
) -> None:
    """Nine requests waiting at once with prefill_batch_size 4 join the running batch as 4 + 4 + 1, each group
    after the previous one has read its prompts (given the backlog, mlx-lm's BatchGenerator would take 4, then 1,
    then 3: more prompt passes and KV merges, and sequences finishing on steps of their own); the engine hands them
    to the batch at most ADMITS_PER_STEP per step."""
    spec = {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB", "prefill_batch_size": 4}
    async with serve(make_settings({"small": spec})) as s:
        await s.pool.load("small")
        chat = engine(s, "small")
        chat.decodes_alone = False
        joined: list[int] = []
        inserted: dict[int, int] = {}  # step -> sequences handed to the batch in it
        batch_next, insert = chat.generator.next, chat._insert

        def recording_next() -> Any:
            uids, responses = batch_next()
            if uids:
                joined.append(len(uids))
            return uids, responses

        def recording_insert(sequence: Any, sampler: Any, processors: Any) -> int:
            inserted[chat.steps] = inserted.get(chat.steps, 0) + 1
            return insert(sequence, sampler, processors)

        chat.generator.next = recording_next
        chat._insert = recording_insert  # type: ignore[method-assign]
        held, release = threading.Event(), threading.Event()

        def hold() -> Any:  # keeps the worker busy while all nine requests queue up
            held.set()
            release.wait(5)
            return None
            yield

        holding = asyncio.ensure_future(s.pool.worker.run(hold()))
        assert await asyncio.to_thread(held.wait, 5)
        streams = [chat.generate(chat.tokenizer.encode(f"Story number {n}."), SamplingParams(6)) for n in range(9)]
        firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
        await asyncio.sleep(0.01)  # every stream has queued its sequence
        release.set()
        await holding
        await asyncio.gather(*firsts)
        for stream in streams:
            async for _ in stream:
                pass
        assert joined == [4, 4, 1]
        assert sorted(inserted.values()) == [1, ADMITS_PER_STEP]
