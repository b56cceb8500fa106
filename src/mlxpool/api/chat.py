"""POST /v1/chat/completions and /v1/completions over the chat engine, streamed (SSE) or not."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mlxpool.api.disconnect import run_until_disconnect
from mlxpool.api.errors import error_body, parse_body_or_raise
from mlxpool.api.images import gather_images_or_raise
from mlxpool.api.metrics import count_tokens
from mlxpool.api.offload import run_off_loop_if_large
from mlxpool.api.reasoning import ReasoningSplitter, prompt_opens_thinking
from mlxpool.api.responses import ArrayJSONResponse, Stream
from mlxpool.api.schemas import ChatRequest, CompletionRequest
from mlxpool.api.tools import ToolCallSplitter, ToolFormat, tool_format_or_raise
from mlxpool.engines.chat import ChatEngine, Delta, SamplingParams, TokenLogprob
from mlxpool.engines.vision import VisionEngine, VisionInput
from mlxpool.errors import ContextLengthError, InvalidRequestError, MlxpoolError, UnsupportedKindError
from mlxpool.pool import ModelPool

OCR_PROMPT = "OCR:"
"""What an OCR model is asked when a request gives no text (a model's `prompt` setting overrides it)."""
COMMENT_INTERVAL = 2.0
"""Seconds between `: loading MODEL` comment lines sent to a stream waiting for its model."""


async def create_chat_completion(request: Request) -> Response:
    body = await parse_body_or_raise(request, ChatRequest)
    spec = request.app.state.pool.resolve(body.model, "chat").spec
    vision = spec.kind in ("vision", "ocr")
    images = await gather_images_or_raise(body.messages, request.app.state.settings.server) if vision else []
    messages = [message.as_template_input(vision) for message in body.messages]
    if spec.kind == "ocr" and not _has_text(messages[-1]):
        parts = messages[-1]["content"] if isinstance(messages[-1]["content"], list) else []
        messages[-1]["content"] = [*parts, {"type": "text", "text": spec.prompt or OCR_PROMPT}]
        if "temperature" not in body.model_fields_set:
            body.temperature = 0.0
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("enable_thinking", body.reasoning_effort != "none")
    tools = body.tool_list()

    async def prompt(engine: ChatEngine) -> Prompt:
        forced = body.forces_tool_call
        format = tool_format_or_raise(engine.tokenizer, tools, forced, engine.spec.name) if tools else None

        def render() -> Prompt:
            return _chat_prompt(engine, messages, kwargs, format, images)

        if format is None and not images:  # tools and images make the template's work larger than its text
            return await run_off_loop_if_large(render, sum(len(str(m.get("content") or "")) for m in messages))
        return await asyncio.to_thread(render)

    return await _complete(request, body, prompt, chat=True)


async def create_completion(request: Request) -> Response:
    body = await parse_body_or_raise(request, CompletionRequest)
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise InvalidRequestError("this server takes one prompt per request", param="prompt")
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]

    async def prompt(engine: ChatEngine) -> Prompt:
        ids = await run_off_loop_if_large(lambda: engine.tokenizer.encode(text), len(text))
        return Prompt(list(ids), thinking=False)

    return await _complete(request, body, prompt, chat=False)


async def _complete(request: Request, body: ChatRequest | CompletionRequest, prompt: Any, chat: bool) -> Response:
    pool: ModelPool = request.app.state.pool
    entry = pool.resolve(body.model, "chat")
    request.state.model = entry.spec.name  # for the request log and the metrics
    if entry.spec.kind not in ("chat", "vision", "ocr"):
        raise UnsupportedKindError(
            f"model {entry.spec.name!r} is a {entry.spec.kind} model; this route needs a chat model", param="model"
        )
    if body.n != 1:
        raise InvalidRequestError("n > 1 is not supported; send separate requests", param="n")
    if entry.spec.kind != "chat" and body.logprobs_count() is not None:
        raise InvalidRequestError("logprobs are not supported for vision models", param="logprobs")
    shape = _Shape(entry.spec.name, chat)
    if body.constrained:  # compiling its grammar takes milliseconds: not on the loop
        params = await asyncio.to_thread(body.sampling, entry.spec.max_tokens)
    else:
        params = body.sampling(entry.spec.max_tokens)
    if body.stream:
        stream = _stream(request, pool, shape, prompt, params, body.include_usage)
        return Stream(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    answer = await run_until_disconnect(request, _collect(pool, shape, prompt, params))
    count_tokens(request, shape.model, answer.usage)
    request.state.tokens = answer.usage["total_tokens"]
    return ArrayJSONResponse(shape.whole(answer))


@dataclass
class _Answer:
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    usage: dict[str, Any]
    logprobs: dict[str, Any] | None


async def _collect(pool: ModelPool, shape: _Shape, prompt: Any, params: SamplingParams) -> _Answer:
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[TokenLogprob] = []
    async with pool.acquire(shape.model) as engine:
        assert isinstance(engine, ChatEngine)
        tokens = await _checked_prompt(engine, prompt, params)
        reader = shape.reader(tokens, streaming=False)
        async for delta in engine.generate(tokens.ids, params, tokens.media):
            r, c, t = reader.feed(delta.text, final=delta.finish_reason is not None)
            reasoning.append(r)
            content.append(c)
            calls.extend(t)
            logprobs.extend(delta.logprobs)
            last = delta
    finish = str(_finish_reason(last, bool(calls)))
    usage = _usage(len(tokens.ids), last)
    return _Answer("".join(reasoning), "".join(content), calls, finish, usage, shape.logprobs(logprobs, params))


async def _stream(
    request: Request, pool: ModelPool, shape: _Shape, prompt: Any, params: SamplingParams, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        async for line in pool.wait_ready(shape.model, COMMENT_INTERVAL):
            yield f": {line}\n\n".encode()
        async with pool.acquire(shape.model) as engine:
            assert isinstance(engine, ChatEngine)
            tokens = await _checked_prompt(engine, prompt, params)
            reader = shape.reader(tokens, streaming=True)
            yield _sse(shape.chunk(None, "", "", first=True))
            called, offset = False, 0
            async for delta in engine.generate(tokens.ids, params, tokens.media):
                reasoning, content, calls = reader.feed(delta.text, final=delta.finish_reason is not None)
                called = called or bool(calls)
                finish = _finish_reason(delta, called)
                if reasoning or content or calls or finish or delta.logprobs:
                    chunk = shape.chunk(finish, content, reasoning, calls=calls)
                    chunk["choices"][0]["logprobs"] = shape.logprobs(list(delta.logprobs), params, offset)
                    yield _sse(chunk)
                offset += sum(len(e.token) for e in delta.logprobs)
                last = delta
        usage = _usage(len(tokens.ids), last)
        count_tokens(request, shape.model, usage)
        request.state.tokens = usage["total_tokens"]
        if include_usage:
            yield _sse(shape.usage_chunk(usage))
    except MlxpoolError as exc:  # the 200 is already sent: report the error in the stream, as OpenAI does
        yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
    yield b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    thinking: bool
    """The chat template opened a `<think>` block: the model starts by reasoning."""
    tools: ToolFormat | None = None
    """How the model writes tool calls, when the request gave it tools."""
    media: VisionInput | None = None
    """The prompt text and images, for vision models."""


async def _checked_prompt(engine: ChatEngine, prompt: Any, params: SamplingParams) -> Prompt:
    tokens: Prompt = await prompt(engine)
    limit = engine.context_length
    if limit is not None and len(tokens.ids) >= limit:
        raise ContextLengthError(
            f"the prompt is {len(tokens.ids)} tokens; model {engine.spec.name!r} has a context of {limit} tokens",
            param="messages",
        )
    return tokens


def _has_text(message: dict[str, Any]) -> bool:
    content = message["content"]
    return bool(content.strip()) if isinstance(content, str) else any(p.get("text", "").strip() for p in content)


def _chat_prompt(
    engine: ChatEngine,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    tools: ToolFormat | None,
    images: list[Any],
) -> Prompt:
    if tools is not None:
        kwargs = {**kwargs, "tools": tools.tools}
    try:
        text = engine.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # the model's template rejected these messages (roles, order)
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc
    ids = list(engine.tokenizer.encode(text, add_special_tokens=False))
    media = VisionInput(text, tuple(images)) if isinstance(engine, VisionEngine) else None
    return Prompt(ids, prompt_opens_thinking(text), tools, media)


def _finish_reason(last: Delta, called: bool) -> str | None:
    """OpenAI says `tool_calls` when an answer that called tools ended by itself."""
    return "tool_calls" if called and last.finish_reason == "stop" else last.finish_reason


def _logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's `choices[].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


def _legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Legacy completions' logprobs: parallel lists, `text_offset` counted from the start of the completion."""
    offsets = [offset + sum(len(e.token) for e in entries[:i]) for i in range(len(entries))]
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, last: Delta) -> dict[str, Any]:
    prompt_tokens = last.prompt_tokens or prompt_tokens  # the engine's count includes image tokens
    completion = last.completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class _Reader:
    """Generated text -> (reasoning, content, finished tool calls); legacy completions take it as it comes."""

    def __init__(self, prompt: Prompt | None, streaming: bool):
        self.reasoning = ReasoningSplitter(prompt.thinking) if prompt is not None else None
        self.tools = ToolCallSplitter(prompt.tools, streaming) if prompt is not None and prompt.tools else None

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning else ("", text)
        if self.tools is None:
            return reasoning, content, []
        content, calls = self.tools.feed(content, final)
        return reasoning, content, calls


class _Shape:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, model: str, chat: bool):
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def logprobs(self, entries: list[TokenLogprob], params: SamplingParams, offset: int = 0) -> dict[str, Any] | None:
        """`choices[].logprobs` in this route's shape, or None when the request did not ask for them."""
        if params.logprobs is None:
            return None
        return _logprobs(entries) if self.chat else _legacy_logprobs(entries, offset)

    def reader(self, prompt: Prompt, streaming: bool) -> _Reader:
        return _Reader(prompt if self.chat else None, streaming)

    def whole(self, answer: _Answer) -> dict[str, Any]:
        if self.chat:
            reply: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if answer.reasoning:
                reply["reasoning_content"] = answer.reasoning
            if answer.tool_calls:
                reply["tool_calls"] = answer.tool_calls
                reply["content"] = answer.content.strip() or None
            choice = {"index": 0, "message": reply, "logprobs": answer.logprobs, "finish_reason": answer.finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {
                "index": 0,
                "text": answer.content,
                "logprobs": answer.logprobs,
                "finish_reason": answer.finish_reason,
            }
            body = self._envelope("text_completion", [choice])
        return {**body, "usage": answer.usage}

    def chunk(
        self,
        finish: str | None,
        content: str,
        reasoning: str,
        first: bool = False,
        calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if not self.chat:
            return self._envelope("text_completion", [{"index": 0, "text": content, "finish_reason": finish}])
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = calls
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": usage}
