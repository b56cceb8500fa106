"""Tool calling: `tools` reach the chat template, and the model's tool-call blocks become `tool_calls`.

Each model family writes calls its own way (`<tool_call>{json}</tool_call>` for Qwen, `[TOOL_CALLS]` for
Mistral, ...); mlx-lm's tokenizer wrapper knows the markers and the parser of the loaded model. `tool_choice`
"required" or a named function is enforced with a grammar, for the JSON call format (Qwen's and its kin).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxpool.api.reasoning import partial_tag
from mlxpool.errors import InvalidRequestError

JSON_START, JSON_END = "<tool_call>", "</tool_call>"
"""The markers of the JSON call format, the one a forced tool call is written in."""


@dataclass(frozen=True)
class ToolFormat:
    start: str
    end: str
    parse: Callable[[str, Any], Any]
    """mlx-lm's parser: the text between the markers -> {"name", "arguments"} or a list of them."""
    tools: list[dict[str, Any]]


def tool_format_or_raise(tokenizer: Any, tools: list[dict[str, Any]], forced: bool, model: str) -> ToolFormat:
    """How this model writes tool calls, or a 400 when it cannot call tools (or not in a form we can force)."""
    if not tokenizer.has_tool_calling:
        raise InvalidRequestError(f"model {model!r} does not support tool calling", param="tools")
    if forced and (tokenizer.tool_call_start, tokenizer.tool_call_end) != (JSON_START, JSON_END):
        raise InvalidRequestError(
            f"tool_choice 'required' or a named function needs a model with JSON tool calls; "
            f"model {model!r} writes {tokenizer.tool_call_start!r}: use tool_choice 'auto'",
            param="tool_choice",
        )
    return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, tools)


def forced_call_grammar(tools: list[dict[str, Any]], name: str | None) -> str:
    """A grammar for exactly one JSON tool call, to `name` or to any of `tools`."""
    from llguidance import LLMatcher

    functions = [tool["function"] for tool in tools if name is None or tool["function"]["name"] == name]
    if not functions:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    start, end = json.dumps(JSON_START + "\n"), json.dumps("\n" + JSON_END)
    lark = f"start: {start} call {end}\ncall: %json {json.dumps(schema)}\n"
    grammar: str = LLMatcher.grammar_from_lark(lark)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = "; ".join(messages)
        raise InvalidRequestError(f"tools: a function's parameters cannot be used: {reason}", param="tools")
    return grammar


class ToolCallSplitter:
    """Splits answer text into plain content and finished tool calls, with markers cut across deltas."""

    def __init__(self, format: ToolFormat, streaming: bool):
        self.format = format
        self.streaming = streaming
        self.buffer = ""
        self.inside = False
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            marker = self.format.end if self.inside else self.format.start
            at = self.buffer.find(marker)
            if at < 0:
                break
            piece, self.buffer = self.buffer[:at], self.buffer[at + len(marker) :]
            if self.inside:
                parsed = self._parse(piece)
                calls.extend(parsed)
                if not parsed:  # not a call after all: the reader sees what the model wrote
                    content.append(self.format.start + piece + self.format.end)
            else:
                content.append(piece)
            self.inside = not self.inside
        if final:
            if self.inside:  # cut off mid-call (max_tokens): keep the text, it is no call
                content.append(self.format.start)
            content.append(self.buffer)
            self.buffer = ""
        elif not self.inside:
            keep = partial_tag(self.buffer, self.format.start)
            content.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
        return "".join(content), calls

    def _parse(self, text: str) -> list[dict[str, Any]]:
        try:
            parsed = self.format.parse(text, self.format.tools)
        except (ValueError, TypeError, KeyError):
            return []
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return []
            arguments = call.get("arguments", {})
            out: dict[str, Any] = {
                "id": call.get("id") or "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
            if self.streaming:
                out["index"] = self.calls
            self.calls += 1
            calls.append(out)
        return calls
