"""Choosing the next token of every sequence in a batch from its log probabilities.

mlx-lm's samplers are `mx.compile`d functions, which trace again for every new input shape and every new
parameter value. In a continuous batch the batch size changes all the time, and on CUDA each new trace compiles
new kernels, on the one MLX thread: a step that meets a new batch size stalls for up to seconds (measured in
docs/benchmarks.md). These samplers are plain MLX operations, the same kernels whatever the batch size.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx


class Sampler:
    """Temperature sampling restricted by top-k, top-p (nucleus) and min-p, in that order; greedy at temperature 0.

    `logprobs` is (batch, vocabulary); one token per row comes back. Filters only remove tokens: the most likely
    one always survives.
    """

    def __init__(self, temperature: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0):
        self.temperature = temperature
        self.top_p = top_p
        self.min_p = min_p
        self.top_k = top_k

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self.top_k < logprobs.shape[-1]:
            logprobs = _below(logprobs, mx.topk(logprobs, self.top_k, axis=-1).min(axis=-1, keepdims=True))
        if 0 < self.top_p < 1:
            logprobs = _nucleus(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = _below(logprobs, logprobs.max(axis=-1, keepdims=True) + math.log(self.min_p))
        return mx.random.categorical(logprobs * (1 / self.temperature))


def _below(logprobs: mx.array, threshold: mx.array) -> mx.array:
    """`logprobs` with every entry below its row's threshold removed."""
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def _nucleus(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the most likely tokens until their probability adds up to `top_p` of what is left."""
    ranked = -mx.sort(-logprobs, axis=-1)  # most likely first
    probs = mx.exp(ranked.astype(mx.float32))
    before = mx.cumsum(probs, axis=-1) - probs  # the mass of the tokens ranked above each one
    kept = (before < top_p * probs.sum(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True)
    return _below(logprobs, mx.take_along_axis(ranked, kept - 1, axis=-1))


@functools.lru_cache(maxsize=64)
def shared_sampler(temperature: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> Sampler:
    """One sampler per distinct setting: mlx-lm samples a batch in one call per step only when every row has the
    same sampler object (row by row otherwise)."""
    return Sampler(temperature, top_p, min_p, top_k)
