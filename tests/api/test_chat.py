"""/v1/chat/completions and /v1/completions on a tiny random-weight Qwen3 (outputs are gibberish: we test
structure, lengths, stop handling and batching, not content)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from mlxpool.demo import build_tiny_chat
from mlxpool.engines.chat import ChatEngine, SamplingParams
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import slow_load

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("tiny-chat") / "qwen3")


@pytest.fixture
async def served(serve: ServeFactory, tiny_chat: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {"chat": {"kind": "chat", "path": str(tiny_chat), "aliases": ["completions"], "memory_reserve": "16MB"}}
    )
    async with serve(settings) as s:
        yield s


def engine(s: Served) -> ChatEngine:
    assert isinstance(s.pool.entries["chat"].engine, ChatEngine)
    return s.pool.entries["chat"].engine


async def greedy(s: Served, **kwargs: Any) -> Any:
    return await s.openai.chat.completions.create(
        model="chat", messages=HELLO, temperature=0, **{"max_tokens": 12, **kwargs}
    )


async def test_max_tokens_ends_with_length_and_counts_usage(served: Served) -> None:
    response = await greedy(served, max_tokens=7)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert response.usage is not None and response.usage.completion_tokens == 7
    prompt = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    assert response.usage.prompt_tokens == len(engine(served).tokenizer.encode(prompt))
    assert response.object == "chat.completion" and response.model == "chat"


async def test_max_completion_tokens_is_honoured(served: Served) -> None:
    response = await served.openai.chat.completions.create(model="chat", messages=HELLO, max_completion_tokens=3)
    assert response.usage is not None and response.usage.completion_tokens == 3


async def test_streaming_chunks_match_the_whole_answer(served: Served) -> None:
    whole = await greedy(served)
    stream = await served.openai.chat.completions.create(
        model="chat", messages=HELLO, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_end_the_answer_and_are_never_sent(served: Served, stream: bool) -> None:
    full = (await greedy(served, max_tokens=16)).choices[0].message.content or ""
    assert len(full) > 6
    stop = full[3:6]
    cut = full[: full.find(stop)]
    if stream:
        chunks = await served.openai.chat.completions.create(
            model="chat", messages=HELLO, temperature=0, max_tokens=16, stop=[stop, "never-there"], stream=True
        )
        parts = [c async for c in chunks]
        text = "".join(c.choices[0].delta.content or "" for c in parts)
        finish = [c.choices[0].finish_reason for c in parts if c.choices[0].finish_reason]
        assert text == cut and finish == ["stop"]
    else:
        response = await greedy(served, max_tokens=16, stop=stop)
        assert response.choices[0].message.content == cut and response.choices[0].finish_reason == "stop"


async def test_the_same_seed_gives_the_same_sample(served: Served) -> None:
    one = await served.openai.chat.completions.create(model="chat", messages=HELLO, max_tokens=10, seed=7)
    two = await served.openai.chat.completions.create(model="chat", messages=HELLO, max_tokens=10, seed=7)
    assert one.choices[0].message.content == two.choices[0].message.content


async def test_concurrent_requests_share_decode_steps(served: Served) -> None:
    await greedy(served, max_tokens=1)  # load
    before = engine(served).describe()
    results = await asyncio.gather(*(greedy(served, max_tokens=10) for _ in range(8)))
    after = engine(served).describe()
    assert all(r.usage is not None and r.usage.completion_tokens == 10 for r in results)
    assert after["generated_tokens"] - before["generated_tokens"] == 80
    assert after["steps"] - before["steps"] < 40  # one step decodes every sequence in flight
    texts = {r.choices[0].message.content for r in results}
    assert len(texts) == 1  # greedy: batching does not change the answer


async def test_legacy_completions(served: Served) -> None:
    response = await served.openai.completions.create(model="completions", prompt="hello", max_tokens=4)
    assert response.object == "text_completion" and response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 4
    stream = await served.openai.completions.create(model="chat", prompt="hello", max_tokens=4, stream=True)
    assert len([c async for c in stream]) >= 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "chat", "messages": HELLO, "n": 2}, 400, "n"),
        ({"model": "chat", "messages": []}, 400, "messages"),
        ({"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"model": "chat", "messages": HELLO, "temperature": 3}, 400, "temperature"),
        ({"model": "chat", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "chat", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        (
            {"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages",
        ),
        ({"model": "nope", "messages": HELLO}, 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(served: Served, body: dict[str, Any], status: int, param: str) -> None:
    response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


async def test_a_prompt_longer_than_the_context_is_a_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="context of 512 tokens"):
        await served.openai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello " * 600}], max_tokens=2
        )


async def test_a_client_that_leaves_frees_its_batch_slot(served: Served) -> None:
    await greedy(served, max_tokens=1)
    chat = engine(served)
    prompt = chat.tokenizer.encode("hello")
    stream = chat.generate(prompt, SamplingParams(max_tokens=500))
    await anext(stream)
    assert chat.describe()["active_sequences"] == 1
    await stream.aclose()  # what a disconnect does to the route's generator
    for _ in range(100):
        if chat.describe()["active_sequences"] == 0:
            break
        await asyncio.sleep(0.01)
    assert chat.describe()["active_sequences"] == 0
    assert chat.describe()["generated_tokens"] < 100


async def test_a_stream_waiting_for_a_cold_model_gets_comment_lines(
    serve: ServeFactory, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxpool.api import chat as chat_api

    monkeypatch.setattr(chat_api, "COMMENT_INTERVAL", 0.02)
    settings = make_settings({"chat": {"kind": "chat", "path": str(tiny_chat)}})
    async with serve(settings, loader=slow_load) as s:
        body = {"model": "chat", "messages": HELLO, "max_tokens": 3, "stream": True}
        async with s.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments and comments[0] == ": loading chat"
    assert lines[-1] == "data: [DONE]" and lines.index(comments[-1]) < lines.index(
        next(x for x in lines if x.startswith("data:"))
    )


@pytest.fixture(scope="session")
def thinking_chat(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a Qwen3-style template: it opens a thought unless `enable_thinking` is false."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("thinking") / "qwen3"
    shutil.copytree(tiny_chat, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] += (
        "{% if add_generation_prompt and (enable_thinking is not defined or enable_thinking) %}<think>\n{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_goes_to_reasoning_content_and_the_switch_reaches_the_template(
    serve: ServeFactory, thinking_chat: Path, stream: bool
) -> None:
    settings = make_settings({"chat": {"kind": "chat", "path": str(thinking_chat)}})
    async with serve(settings) as s:

        async def ask(**extra: Any) -> tuple[str, str]:
            kwargs: dict[str, Any] = {"model": "chat", "messages": HELLO, "max_tokens": 8, "temperature": 0, **extra}
            if not stream:
                message = (await s.openai.chat.completions.create(**kwargs)).choices[0].message
                return getattr(message, "reasoning_content", None) or "", message.content or ""
            chunks = [c async for c in await s.openai.chat.completions.create(stream=True, **kwargs)]
            deltas = [c.choices[0].delta for c in chunks]
            return (
                "".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                "".join(d.content or "" for d in deltas),
            )

        # mlx-lm turns thinking on by default only for tokenizers with <think> tokens; this tiny one has none.
        reasoning, content = await ask(extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        assert reasoning and content == ""  # random weights never close the thought in 8 tokens
        reasoning, content = await ask(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert content and reasoning == ""
        reasoning, content = await ask(reasoning_effort="none")
        assert content and reasoning == ""


async def test_logprobs_with_top_alternatives(served: Served) -> None:
    response = await greedy(served, max_tokens=6, logprobs=True, top_logprobs=3)
    assert response.choices[0].logprobs is not None
    entries = response.choices[0].logprobs.content
    assert entries is not None and len(entries) == 6
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.token == entry.top_logprobs[0].token and abs(entry.logprob - ranked[0]) < 1e-4
    plain = await greedy(served, max_tokens=6)
    assert plain.choices[0].logprobs is None


async def test_streamed_logprobs_cover_every_token(served: Served) -> None:
    stream = await served.openai.chat.completions.create(
        model="chat", messages=HELLO, temperature=0, max_tokens=6, logprobs=True, stream=True
    )
    entries = [
        e for c in [c async for c in stream] if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert len(entries) == 6 and all(e.top_logprobs == [] for e in entries)


async def test_top_logprobs_without_logprobs_is_a_400(served: Served) -> None:
    response = await served.http.post(
        "/v1/chat/completions", json={"model": "chat", "messages": HELLO, "top_logprobs": 2}
    )
    assert response.status_code == 400 and "top_logprobs needs logprobs" in response.json()["error"]["message"]


SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}, "n": {"type": "integer",
                   "minimum": 0, "maximum": 9}},
    "required": ["color", "ok", "n"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
async def test_json_schema_output_parses_and_validates(served: Served, stream: bool, seed: int) -> None:
    import json

    kwargs: dict[str, Any] = {
        "model": "chat", "messages": HELLO, "max_tokens": 60, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    }  # fmt: skip
    if stream:
        chunks = [c async for c in await served.openai.chat.completions.create(stream=True, **kwargs)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = (await served.openai.chat.completions.create(**kwargs)).choices[0]
        text, finish = choice.message.content or "", choice.finish_reason
    value = json.loads(text)
    assert finish == "stop" and set(value) == {"color", "ok", "n"}
    assert value["color"] in ("red", "green") and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


async def test_json_object_output_is_an_object(served: Served) -> None:
    import json

    finished = 0
    for seed in range(6):
        choice = (
            await served.openai.chat.completions.create(
                model="chat", messages=HELLO, max_tokens=40, seed=seed, response_format={"type": "json_object"}
            )
        ).choices[0]
        text = choice.message.content or ""
        assert text.startswith("{")
        if choice.finish_reason == "stop":  # random weights may also run out of tokens inside a string
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished > 0


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, {"type": "xml"}],
)
async def test_unusable_response_formats_are_a_400(served: Served, response_format: dict[str, Any]) -> None:
    body = {"model": "chat", "messages": HELLO, "response_format": response_format}
    response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


async def test_a_failed_generation_step_is_a_500_and_the_engine_goes_on(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    await greedy(served, max_tokens=1)
    chat = engine(served)
    real = chat._next

    def broken() -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(chat, "_next", broken)  # the model step, alone or batched
    response = await served.http.post("/v1/chat/completions", json={"model": "chat", "messages": HELLO})
    assert response.status_code == 500
    assert (
        response.json()["error"]["code"] == "generation_failed" and "device lost" in response.json()["error"]["message"]
    )
    body = {"model": "chat", "messages": HELLO, "stream": True}
    async with served.http.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = [line async for line in stream.aiter_lines() if line.startswith("data:")]
    assert '"generation_failed"' in lines[-2] and lines[-1] == "data: [DONE]"
    monkeypatch.setattr(chat, "_next", real)
    assert (await greedy(served, max_tokens=3)).choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_logprobs(served: Served, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "chat", "prompt": "hi", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    if stream:
        chunks = [c async for c in await served.openai.completions.create(stream=True, **kwargs)]
        parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for p in parts for t in p.tokens or []]
        offsets = [o for p in parts for o in p.text_offset or []]
        tops = [t for p in parts for t in p.top_logprobs or []]
    else:
        choice = (await served.openai.completions.create(**kwargs)).choices[0]
        assert choice.logprobs is not None
        text, tokens = choice.text, choice.logprobs.tokens or []
        offsets, tops = choice.logprobs.text_offset or [], choice.logprobs.top_logprobs or []
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs or [])
    assert len(tokens) == 6 and "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]
    assert all(len(top) <= 3 and tok in top for top, tok in zip(tops, tokens, strict=True))  # greedy: the top one
    refused = await served.http.post("/v1/completions", json={**kwargs, "logprobs": 6})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
