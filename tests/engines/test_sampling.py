"""The batch sampler: each filter keeps what it should, rows are independent, and nothing retraces per shape."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mlxpool.engines import sampling
from mlxpool.engines.sampling import Sampler, shared_sampler


def logprobs_of(rows: list[list[float]]) -> mx.array:
    probs = mx.array(rows)
    return mx.log(probs / probs.sum(axis=-1, keepdims=True))


def draws(sampler: Sampler, logprobs: mx.array, n: int = 400) -> list[set[int]]:
    """The set of tokens each row produced over `n` draws."""
    mx.random.seed(0)
    seen: list[set[int]] = [set() for _ in range(logprobs.shape[0])]
    for _ in range(n):
        for row, token in enumerate(sampler(logprobs).tolist()):  # type: ignore[arg-type]
            seen[row].add(token)  # type: ignore[arg-type]
    return seen


PROBS = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]


def test_temperature_zero_is_the_most_likely_token() -> None:
    assert Sampler(0.0)(logprobs_of(PROBS)).tolist() == [0, 3]


def test_without_filters_every_token_can_come_up() -> None:
    assert draws(Sampler(1.0), logprobs_of(PROBS)) == [{0, 1, 2, 3}, {0, 1, 2, 3}]


def test_top_k_keeps_the_k_most_likely_of_each_row() -> None:
    assert draws(Sampler(1.0, top_k=2), logprobs_of(PROBS)) == [{0, 1}, {2, 3}]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # the mass ranked above the third token is 0.7: it goes at 0.65, stays at 0.75
    assert draws(Sampler(1.0, top_p=0.65), logprobs_of(PROBS)) == [{0, 1}, {2, 3}]
    assert draws(Sampler(1.0, top_p=0.75), logprobs_of(PROBS)) == [{0, 1, 2}, {1, 2, 3}]
    assert draws(Sampler(1.0, top_p=0.01), logprobs_of(PROBS)) == [{0}, {3}]


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely() -> None:
    # 0.5 of the top probability 0.4 is 0.2: 0.1 goes
    assert draws(Sampler(1.0, min_p=0.5), logprobs_of(PROBS)) == [{0, 1, 2}, {1, 2, 3}]


def test_filters_combine() -> None:
    assert draws(Sampler(1.0, top_k=3, top_p=0.5), logprobs_of(PROBS)) == [{0, 1}, {2, 3}]


def test_low_temperature_sharpens() -> None:
    mx.random.seed(1)
    picks = [Sampler(0.05)(logprobs_of(PROBS)).tolist() for _ in range(50)]
    assert picks.count([0, 3]) >= 49  # p(second token) ~ (0.75)^20 per row


def test_the_frequencies_follow_the_probabilities() -> None:
    mx.random.seed(2)
    logprobs = mx.repeat(logprobs_of([PROBS[0]]), 4000, axis=0)
    tokens = Sampler(1.0)(logprobs)
    share = [(tokens == t).sum().item() / 4000 for t in range(4)]
    assert share == pytest.approx(PROBS[0], abs=0.03)


def test_a_seed_repeats_the_draw() -> None:
    logprobs = logprobs_of(PROBS * 8)
    mx.random.seed(7)
    first = Sampler(0.9, top_p=0.95)(logprobs).tolist()
    mx.random.seed(7)
    assert Sampler(0.9, top_p=0.95)(logprobs).tolist() == first


def test_any_batch_size_and_a_removed_row_value() -> None:
    """Rows may already hold -inf (a grammar removed tokens); every batch size samples without tracing."""
    for batch in (1, 3, 64):
        rows = mx.array([[-math.inf, 0.0, -1.0, -2.0]] * batch)
        assert set(Sampler(1.0, top_p=0.9, min_p=0.01, top_k=2)(rows).tolist()) <= {1, 2}  # type: ignore[arg-type]


def test_sequences_with_the_same_sampling_share_one_sampler() -> None:
    """mlx-lm samples a batch in one call only when its rows share the sampler object."""
    assert shared_sampler(0.7, 0.9, 0.0, 0) is shared_sampler(0.7, 0.9, 0.0, 0)
    assert shared_sampler(0.7, 0.9, 0.0, 0) is not shared_sampler(0.2, 0.9, 0.0, 0)


def test_a_new_setting_reuses_the_compiled_graph() -> None:
    """A new temperature, top-p or min-p must not trace (and so compile) the graph again: on CUDA that stalls every
    model for seconds. A batch shape not seen before may."""
    logprobs = logprobs_of(PROBS * 3)
    Sampler(0.8, top_p=0.9, min_p=0.05)(logprobs)
    before = sampling.traces
    for temperature, top_p, min_p in ((0.3, 0.5, 0.01), (1.3, 0.95, 0.2), (0.71, 0.8, 0.1)):
        Sampler(temperature, top_p=top_p, min_p=min_p)(logprobs).tolist()
    assert sampling.traces == before
    Sampler(0.8, top_p=0.9, min_p=0.05)(logprobs_of(PROBS * 5)).tolist()
    assert sampling.traces == before + 1  # the counter does count traces
