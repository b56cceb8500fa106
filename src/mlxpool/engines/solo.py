"""A sequence decoded alone while it is the engine's only one, without `BatchGenerator`'s per-step bookkeeping
(which costs about a quarter of the decode speed at batch size one).

Like mlx-lm's `generate_step`, each step builds the next token's graph before waiting for the current one, so
Python runs while the GPU works. Prompts are read `prefill_step_size` tokens per step. When another request
arrives, `handoff` gives the batch what it needs to go on from here with the same KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx


@dataclass
class Handoff:
    cache: list[Any]
    cached_tokens: list[int]
    """The tokens whose KV `cache` holds."""
    to_read: list[int]
    """The tokens the batch reads next (the rest of the prompt, or the token just produced)."""
    produced: tuple[int, mx.array] | None
    """A token (and its log probabilities) produced by the hand-off itself, to be sent like any other."""


class SoloDecoder:
    def __init__(
        self,
        model: Any,
        prompt: list[int],
        cache: list[Any] | None,
        rest: list[int],
        sampler: Any,
        processors: list[Any],
        max_tokens: int,
        prefill_step_size: int,
    ):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.sampler = sampler
        self.processors = processors
        self.max_tokens = max_tokens
        self.prefill_step_size = prefill_step_size
        self.read = prompt[: len(prompt) - len(rest)]
        """Prompt tokens whose KV is in the cache."""
        self.tokens: list[int] = []
        self._forwarded = 0
        """How many of `tokens` the model has read (the last one may not be yet)."""
        self._rest = rest
        self._pending: tuple[mx.array, mx.array] | None = None
        self._context = mx.array(self.read, dtype=mx.int32) if processors else None

    @property
    def in_cache(self) -> list[int]:
        """The tokens whose KV the cache holds."""
        return self.read + self.tokens[: self._forwarded]

    def step(self) -> tuple[int, mx.array] | None:
        """Read a chunk of the prompt (None), or produce the next token and its log probabilities."""
        if len(self._rest) > self.prefill_step_size:
            chunk, self._rest = self._rest[: self.prefill_step_size], self._rest[self.prefill_step_size :]
            self.model(mx.array(chunk)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.read = self.read + chunk
            self._extend_context(mx.array(chunk, dtype=mx.int32))
            return None
        if self._pending is None:
            self._pending = self._forward(mx.array(self._rest, dtype=mx.int32))
            self.read, self._rest = self.read + self._rest, []
        token, logprobs = self._pending
        self._pending = None
        if len(self.tokens) + 1 < self.max_tokens:  # start the next step before waiting for this one
            self._pending = self._forward(token)
            self._forwarded += 1
        produced = int(token.item())  # type: ignore[arg-type]
        self.tokens.append(produced)
        return produced, logprobs

    def _forward(self, inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Read `inputs` (1-D token ids) and sample the next token, lazily."""
        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.processors:
            context = self._extend_context(inputs)
            for processor in self.processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        sampled = self.sampler(logprobs)
        mx.async_eval(sampled, logprobs)  # type: ignore[no-untyped-call]
        return sampled, logprobs.squeeze(0)

    def _extend_context(self, inputs: mx.array) -> mx.array:
        """All tokens read so far, for logits processors (penalties look back over them)."""
        if self._context is None:
            return inputs
        self._context = mx.concatenate([self._context, inputs.astype(mx.int32)])
        return self._context

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def handoff(self) -> Handoff:
        """Stop, and give a batch what it needs to go on where this left off."""
        if self._pending is None:
            return Handoff(self.cache, self.in_cache, self._rest, None)
        token, logprobs = self._pending
        self._pending = None
        produced = int(token.item())  # type: ignore[arg-type]
        self.tokens.append(produced)
        return Handoff(self.cache, self.in_cache, [produced], (produced, logprobs))
