"""Choosing the next token of every sequence in a batch from its log probabilities.

mlx-lm's samplers are `mx.compile`d with their settings as constants: every new temperature (or top-p, min-p)
traces a new graph, and on CUDA compiles new kernels, on the one MLX thread: 3.1-3.8 s on the H200 for each new
temperature a request brings (bench/shape_stalls.py). Here the settings are arrays, inputs of one compiled graph
per batch shape, and its kernels are the same whatever the values (a new batch size retraces in well under 1 ms).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mlx.core as mx

traces = 0
"""How many times the sampling graph has been traced (a new batch shape does it; a new setting must not)."""


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
        self._settings: tuple[mx.array, mx.array, mx.array] | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self.top_k < logprobs.shape[-1]:  # k shapes the graph: not compiled
            logprobs = _below(logprobs, mx.topk(logprobs, self.top_k, axis=-1).min(axis=-1, keepdims=True))
        if self._settings is None:  # made here, on the worker, like every MLX array
            log_min_p = math.log(self.min_p) if self.min_p > 0 else 0.0
            self._settings = mx.array(1 / self.temperature), mx.array(self.top_p), mx.array(log_min_p)
        return _sampling_graph(0 < self.top_p < 1, self.min_p > 0)(logprobs, *self._settings)


@functools.cache
def _sampling_graph(nucleus: bool, min_p: bool) -> Callable[..., mx.array]:
    """The compiled sampling graph with the filters in use; their settings are its inputs."""

    def sample(logprobs: mx.array, inverse_temperature: mx.array, top_p: mx.array, log_min_p: mx.array) -> mx.array:
        global traces
        traces += 1
        if nucleus:
            logprobs = _nucleus(logprobs, top_p)
        if min_p:
            logprobs = _below(logprobs, logprobs.max(axis=-1, keepdims=True) + log_min_p)
        return mx.random.categorical(logprobs * inverse_temperature)

    return mx.compile(sample, inputs=mx.random.state, outputs=mx.random.state)


def _below(logprobs: mx.array, threshold: mx.array) -> mx.array:
    """`logprobs` with every entry below its row's threshold removed."""
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def _nucleus(logprobs: mx.array, top_p: mx.array) -> mx.array:
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
