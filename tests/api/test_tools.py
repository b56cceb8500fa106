"""Tool calling on the tiny Qwen3 (its template uses Qwen's `<tool_call>` JSON format, so mlx-lm picks the
json_tools parser). Random weights never call a tool on their own: calls are forced with tool_choice."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from mlxpool.api.schemas import ChatMessage
from mlxpool.api.tools import ToolCallSplitter, ToolFormat
from mlxpool.demo import build_tiny_chat
from tests.conftest import Served, ServeFactory, make_settings

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Tokyo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("tools") / "qwen3")


@pytest.fixture(scope="module")
def toolless_chat(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with a template that knows nothing of tools."""
    path = tmp_path_factory.mktemp("toolless") / "qwen3"
    shutil.copytree(tiny_chat, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
async def served(serve: ServeFactory, tiny_chat: Path, toolless_chat: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "chat": {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB"},
            "plain": {"kind": "chat", "path": str(toolless_chat), "memory_reserve": "16MB"},
        }
    )
    async with serve(settings) as s:
        yield s


async def ask(s: Served, stream: bool, **kwargs: Any) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """(tool calls, content, finish_reason), with streamed tool-call deltas put together as a client would."""
    kwargs = {"model": "chat", "messages": ASK, "max_tokens": 120, "temperature": 0, **kwargs}
    if not stream:
        choice = (await s.openai.chat.completions.create(**kwargs)).choices[0]
        calls = [call.model_dump() for call in choice.message.tool_calls or []]
        return calls, choice.message.content, choice.finish_reason
    calls_by_index: dict[int, dict[str, Any]] = {}
    content, finish = "", None
    async for chunk in await s.openai.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for call in delta.tool_calls or []:
            calls_by_index.setdefault(call.index, call.model_dump(exclude={"index"}))
    return list(calls_by_index.values()), content or None, finish


@pytest.mark.parametrize("stream", [False, True])
async def test_a_named_tool_choice_gets_a_valid_call(served: Served, stream: bool) -> None:
    calls, content, finish = await ask(
        served, stream, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert finish == "tool_calls" and content is None
    (call,) = calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


async def test_required_calls_one_of_the_tools(served: Served) -> None:
    for seed in range(3):
        calls, _, finish = await ask(
            served, False, tools=[WEATHER, TIME], tool_choice="required", seed=seed, temperature=1
        )
        assert finish == "tool_calls"
        assert [call["function"]["name"] in ("get_weather", "get_time") for call in calls] == [True]


async def test_tools_reach_the_template_unless_tool_choice_is_none(served: Served) -> None:
    async def prompt_tokens(**kwargs: Any) -> int:
        response = await served.openai.chat.completions.create(model="chat", messages=ASK, max_tokens=1, **kwargs)
        assert response.usage is not None
        return int(response.usage.prompt_tokens)

    bare = await prompt_tokens()
    assert await prompt_tokens(tools=[WEATHER]) > bare
    assert await prompt_tokens(tools=[WEATHER], tool_choice="none") == bare


async def test_a_conversation_with_a_tool_result_goes_on(served: Served) -> None:
    calls, _, _ = await ask(served, False, tools=[WEATHER], tool_choice="required")
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},  # type: ignore[typeddict-item]
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21 C"},
    ]
    response = await served.openai.chat.completions.create(
        model="chat", messages=history, tools=[WEATHER], max_tokens=4, temperature=0
    )  # greedy: the random model sampled at 1.0 may end early ("stop")
    assert response.choices[0].finish_reason == "length"
    without = await served.openai.chat.completions.create(
        model="chat", messages=history[:-1], tools=[WEATHER], max_tokens=1, temperature=0
    )
    assert response.usage is not None and without.usage is not None
    assert response.usage.prompt_tokens > without.usage.prompt_tokens  # the tool result is in the prompt


def test_template_input_has_arguments_as_an_object() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    message = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]})
    assert message.as_template_input()["tool_calls"][0]["function"]["arguments"] == {"x": 1}


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("plain", {"tools": [WEATHER]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        (
            "chat",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("chat", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)
async def test_unusable_tool_requests_are_a_400(served: Served, model: str, extra: dict[str, Any], param: str) -> None:
    response = await served.http.post(
        "/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 4, **extra}
    )
    assert response.status_code == 400, response.text
    assert param in (response.json()["error"]["param"] or "")


def splitter(streaming: bool = True) -> ToolCallSplitter:
    return ToolCallSplitter(
        ToolFormat("<tool_call>", "</tool_call>", lambda text, tools: json.loads(text), []), streaming
    )


def test_splitter_finds_calls_with_markers_cut_across_deltas() -> None:
    text = 'Let me look.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> and '
    text += '<tool_call>{"name": "g"}</tool_call>'
    s = splitter()
    content, calls = "", []
    for i in range(0, len(text), 3):
        piece, found = s.feed(text[i : i + 3], final=i + 3 >= len(text))
        content += piece
        calls += found
    assert content == "Let me look. and "
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "f", {"a": 1}),
        (1, "g", {}),
    ]


def test_splitter_keeps_what_is_not_a_call_as_content() -> None:
    s = splitter(streaming=False)
    assert s.feed("a <tool_call>not json</tool_call> b") == ("a <tool_call>not json</tool_call> b", [])
    assert s.feed("<tool_call>{") == ("", [])
    assert s.feed('"name":', final=True) == ('<tool_call>{"name":', [])  # cut off by max_tokens
    assert splitter().feed("x <tool_", final=False) == ("x ", [])  # maybe a marker: held back
