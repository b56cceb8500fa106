"""A request's life inside a generating engine: its sampling settings, its sequence, and the deltas it receives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

SOLO = -1
"""The uid of the sequence decoding alone (BatchGenerator's uids start at 0)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None
    """Report each token's log probability with this many most likely alternatives; None: off."""
    grammar: str | None = None
    """An llguidance grammar the output must follow (response_format), or None."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Delta:
    """New text of one sequence; the last one of a sequence carries its finish reason."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None
    """Set when the step that was to produce this failed; the sequence ends with it."""
    prompt_tokens: int = 0
    """Tokens the model read for the prompt (with image tokens, for vision models)."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prompt cache instead of being computed."""


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[Delta]
    detokenizer: Any
    uid: int | None = None
    cancelled: bool = False
    tokens: int = 0
    emitted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Entries of tokens whose text has not been sent yet."""
    media: Any = None
    """What a vision model reads besides the text (see engines/vision.py)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    loop: asyncio.AbstractEventLoop | None = field(default_factory=asyncio.get_running_loop)
    """None for the engine's own warm-up sequences (engines/warmup.py): their deltas go nowhere."""


def failure(sequence: Sequence, exc: Exception) -> Delta:
    return Delta("", "error", sequence.tokens, error=str(exc) or type(exc).__name__)


def post(deltas: list[tuple[Sequence, Delta]]) -> None:
    """Hand one worker step's deltas to the event loop in one call: a wake-up per step, not per sequence (each
    wake-up makes the loop thread take the GIL while the worker still wants it)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
    for sequence, delta in deltas:
        if sequence.loop is not None:
            by_loop.setdefault(sequence.loop, []).append((sequence.queue, delta))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)
