"""Request and response bodies, mirroring the OpenAI API reference."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mlxpool.api.tools import forced_call_grammar
from mlxpool.engines.chat import SamplingParams
from mlxpool.engines.structured import json_grammar, schema_of
from mlxpool.errors import InvalidRequestError


class EmbeddingRequest(BaseModel):
    """OpenAI API reference: Embeddings → Create embeddings (POST /v1/embeddings)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ModelCard(BaseModel):
    """OpenAI API reference: Models → The model object; `kind`, `aliases` and `state` are mlxpool's own."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlxpool"
    kind: str
    aliases: list[str]
    state: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """OpenAI API reference: Chat → Create chat completion → messages."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_input(self, vision: bool = False) -> dict[str, Any]:
        """The message as chat templates take it. Text models: text parts joined, others refused. Vision models:
        a list of text parts and `{"type": "image"}` placeholders, in the order the images were given."""
        content: Any = self.content
        if isinstance(content, list):
            allowed = ("text", "image_url") if vision else ("text",)
            other = [part.type for part in content if part.type not in allowed]
            if other:
                raise InvalidRequestError(
                    f"content parts of type {other[0]!r} are not supported by this model", param="messages"
                )
            if vision:
                content = [{"type": "text", "text": p.text or ""} if p.type == "text" else {"type": "image"}
                           for p in content]  # fmt: skip
            else:
                content = "".join(part.text or "" for part in content)
        extra = dict(self.model_extra or {})
        if isinstance(extra.get("tool_calls"), list):
            extra["tool_calls"] = [_decoded_arguments(call) for call in extra["tool_calls"]]
        return {**extra, "role": "system" if self.role == "developer" else self.role, "content": content or ""}


def _decoded_arguments(call: Any) -> Any:
    """Templates render `arguments` as an object; OpenAI sends it as a JSON string."""
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except ValueError:
            return call
    return call


class FunctionDefinition(BaseModel):
    """OpenAI API reference: Chat → Create chat completion → tools → function."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """The sampling fields chat and legacy completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        return None

    def grammar(self) -> str | None:
        return None

    @property
    def constrained(self) -> bool:
        """The output must follow a grammar (`grammar()` compiles one)."""
        return False

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=self.requested_max_tokens() or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=tuple(stops),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=self.logprobs_count(),
            grammar=self.grammar(),
        )


class ChatRequest(_Generation):
    """OpenAI API reference: Chat → Create chat completion (POST /v1/chat/completions)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none", "auto") and not info.data.get("tools"):
            raise ValueError("tool_choice needs tools")
        return value

    def tool_list(self) -> list[dict[str, Any]]:
        """The tools the model is shown: none when tool_choice is "none"."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def grammar(self) -> str | None:
        if self.forces_tool_call:
            name = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
            return forced_call_grammar(self.tool_list(), name)
        constrained, schema = schema_of(self.response_format or {})
        return json_grammar(schema) if constrained else None

    @property
    def constrained(self) -> bool:
        return self.forces_tool_call or schema_of(self.response_format or {})[0]


class CompletionRequest(_Generation):
    """OpenAI API reference: Completions → Create completion (POST /v1/completions, legacy)."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """The log probability of each token and of the `logprobs` most likely alternatives (legacy API: up to 5)."""

    def logprobs_count(self) -> int | None:
        return self.logprobs
