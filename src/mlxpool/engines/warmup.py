"""A chat model's warm-up at load: a few short generations through the paths serving takes.

MLX's CUDA backend compiles a kernel the first time a graph needs it, on the one MLX thread; on a machine whose
kernel cache is empty that took 3-15 s inside a served step, and every request to every model waited for it
(docs/benchmarks.md). The warm-up meets those kernels while the model loads: a sequence alone, one joining from
the prompt cache, a batch that grows by a group and shrinks as rows finish, greedy and sampled rows. It runs a
worker step at a time (other models keep their turns) and leaves the engine as it found it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlxpool.engines.kv import PromptCache
from mlxpool.engines.sequences import SamplingParams, Sequence
from mlxpool.worker import Task

if TYPE_CHECKING:
    from mlxpool.engines.chat import ChatEngine

log = logging.getLogger(__name__)

PROMPT_TOKENS = 12
STEPS_LIMIT = 200
"""Worker steps after which the warm-up stops whatever is left (it needs about 30)."""


@dataclass(frozen=True)
class WarmUp:
    """What a warm-up went through."""

    steps: int
    tokens: int
    alone: int
    """Sequences that decoded alone (engines/solo.py)."""
    handoffs: int
    cached_tokens: int
    """Prompt tokens that came from the prompt cache."""
    joins: int
    """Groups that joined the running batch."""
    seconds: float


def warm_up(engine: ChatEngine) -> Task[WarmUp]:
    """Generate a few tokens in each serving path. A failure is logged, not raised: the model loads anyway and
    requests report their own errors."""
    vocab = max(2, min(engine.vocab_size, len(engine.tokenizer.vocab)))
    prompt = [(7 * i + 3) % vocab for i in range(PROMPT_TOKENS)]
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    sampled = SamplingParams(max_tokens=6, temperature=0.7)
    nucleus = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9)  # each filter compiles its own kernels
    # (sequences that arrive, worker steps before the next arrive; None: until the engine is idle)
    waves = [
        ([_sequence(engine, prompt, greedy)], None),  # alone; leaves its KV in the prompt cache
        ([_sequence(engine, [*prompt, 5, 6, 7], nucleus)], 2),  # alone, from that cached prefix...
        ([_sequence(engine, prompt, greedy), _sequence(engine, prompt[:5], sampled)], 3),  # ...handed to a batch
        ([_sequence(engine, prompt[3:], sampled), _sequence(engine, prompt[2:], sampled)], None),  # a group joins
    ]
    steps, started = 0, time.perf_counter()
    try:
        for sequences, count in waves:
            engine._incoming.extend(sequences)
            budget = STEPS_LIMIT - steps if count is None else count
            while budget > 0 and engine.has_work():
                engine.step()
                steps, budget = steps + 1, budget - 1
                yield
        if quiet := [s for sequences, _ in waves for s in sequences if s.tokens == 0]:
            log.warning("model %r: %d warm-up sequences generated nothing", engine.spec.name, len(quiet))
    except Exception:
        log.exception("model %r: warm-up failed; serving without it", engine.spec.name)
    done = WarmUp(
        steps, engine.generated_tokens, engine.alone, engine.handoffs, engine.cached_tokens,
        getattr(engine.generator, "joins", 0), time.perf_counter() - started,
    )  # fmt: skip
    _reset(engine)
    return done


def _sequence(engine: ChatEngine, prompt: list[int], params: SamplingParams) -> Sequence:
    return Sequence(list(prompt), params, asyncio.Queue(), engine.tokenizer.detokenizer, loop=None)


def _reset(engine: ChatEngine) -> None:
    """Drop what the warm-up left: its sequences, its prompt cache entries, its counts."""
    for sequence in [*engine._incoming, *engine._active.values()]:
        sequence.cancelled = True
    engine._incoming.clear()
    engine._drop_cancelled()
    if engine.prompt_cache is not None:
        engine.prompt_cache = PromptCache(max_size=engine.prompt_cache.max_size)
    engine.steps = engine.generated_tokens = engine.cached_tokens = engine.alone = engine.handoffs = 0
    engine._count_cache()
