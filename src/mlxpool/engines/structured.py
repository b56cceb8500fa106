"""Constrained decoding for `response_format` (json_object, json_schema) with llguidance.

A logits processor per sequence: before each token, llguidance's matcher says which tokens keep the output
inside the grammar; the others get -inf. Backend-neutral: the mask is applied with `mx.where`, not a Metal kernel.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from mlxpool.errors import InvalidRequestError


def json_grammar(schema: dict[str, Any] | None) -> str:
    """llguidance's grammar for JSON matching `schema` (any object when None), or a 400 naming what is wrong."""
    from llguidance import LLMatcher

    # Compact JSON: with flexible whitespace small models can pad forever instead of closing the object.
    target = schema if schema is not None else {"type": "object"}
    grammar: str = LLMatcher.grammar_from_json_schema(target, defaults={"whitespace_flexible": False})
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise InvalidRequestError(
            f"response_format: the JSON schema cannot be used: {'; '.join(messages)}", param="response_format"
        )
    return grammar


class GrammarProcessor:
    """An mlx-lm logits processor: `processor(tokens_so_far, logits) -> logits` with disallowed tokens masked."""

    def __init__(self, grammar: str, tokenizer: Any, vocab_size: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(tokenizer, grammar)
        self.vocab_size = vocab_size
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import llguidance.numpy

        if self.started:
            last: int = tokens[..., -1].item()  # type: ignore[assignment]
            self.matcher.consume_token(last)
        self.started = True
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")
        bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, 0)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(bool)
        return mx.where(mx.array(bits), logits, -mx.inf)


def llg_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of an mlx-lm tokenizer, with the model's vocabulary size and end-of-sequence tokens."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(
        tokenizer._tokenizer, n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)
    )


def schema_of(response_format: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(constrained?, schema) from an OpenAI `response_format`."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be an object", param="response_format")
        return True, json.loads(json.dumps(schema))
    raise InvalidRequestError(f"response_format type {kind!r} is not supported", param="response_format")
