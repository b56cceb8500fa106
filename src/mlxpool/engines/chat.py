"""Text generation over mlx-lm with continuous batching.

Requests join and leave one shared batch (engines/batching.py); each worker step is one `next()` of it: a decode
step for every sequence in flight, or one bounded piece of admitting newcomers. Text is detokenized and checked
for stop strings on the worker, and each step's new text goes to the request's queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxpool.config import ModelSpec
from mlxpool.engines.batching import ContinuousBatch
from mlxpool.engines.kv import PromptCache
from mlxpool.engines.pieces import cut_into_pieces, text_layers
from mlxpool.engines.sampling import shared_sampler
from mlxpool.engines.sequences import SOLO, Delta, SamplingParams, Sequence, TokenLogprob, failure, post
from mlxpool.engines.solo import SoloDecoder
from mlxpool.engines.structured import GrammarProcessor, llg_tokenizer
from mlxpool.engines.warmup import warm_up
from mlxpool.engines.weights import materialize
from mlxpool.errors import GenerationError
from mlxpool.worker import Task, Worker

log = logging.getLogger(__name__)

ADMITS_PER_STEP = 8
"""Newcomers handed to the batch per step (prompt cache lookups, samplers): a burst of requests is spread over a few
steps instead of making one long step that every other model waits behind."""


class ChatEngine:
    """mlx-lm text models. Subclasses swap the batch generator (`_make_generator`, `_insert`, `_next`, `_remove`).

    Finished sequences leave their KV cache in an LRU prompt cache (engines/kv.py), keyed by their tokens; a new
    prompt that shares a prefix with one (the next turn of a conversation) starts from it.
    """

    reuses_prompts = True
    decodes_alone = True
    """A sequence that is the only one decodes without the batch (engines/solo.py) until another arrives."""

    def __init__(self, model: Any, tokenizer: Any, spec: ModelSpec, config: dict[str, Any], worker: Worker):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.worker = worker
        text_config = config.get("text_config") or config
        self.context_length = int(text_config.get("max_position_embeddings") or 0) or None
        self.vocab_size = int(text_config.get("vocab_size") or config.get("vocab_size") or len(tokenizer.vocab))
        self._llg_tokenizer: Any = None
        self.generator: Any = self._make_generator()
        self.prompt_cache: Any = None
        if self.reuses_prompts and spec.prompt_cache_size > 0:
            self.prompt_cache = PromptCache(max_size=spec.prompt_cache_size)
        self._solo: SoloDecoder | None = None
        self.cache_bytes = 0
        self.cached_tokens = 0
        self.alone = 0
        self.handoffs = 0
        self._incoming: deque[Sequence] = deque()
        self._active: dict[int, Sequence] = {}
        self._outbox: list[tuple[Sequence, Delta]] = []
        """This step's deltas, posted to the loop together when it ends."""
        self.steps = 0
        self.generated_tokens = 0
        layers = text_layers(model)
        costly = weakref.WeakMethod(self._costly)  # the layers must not keep the engine (and so the model) alive
        self.cut = cut_into_pieces(layers or [], worker, lambda: bool((m := costly()) and m()))
        """Where the forward pass ends its pieces (engines/pieces.py)."""

    # --- loop side -------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: list[int], params: SamplingParams, media: Any = None
    ) -> AsyncGenerator[Delta, None]:
        """Stream the completion of `prompt`. Leaving early (client gone) drops the sequence at the next step."""
        sequence = Sequence(prompt, params, asyncio.Queue(), self.tokenizer.detokenizer, media=media)
        sequence.prompt_tokens = len(prompt)
        self._incoming.append(sequence)
        self.worker.wake()
        try:
            while True:
                delta = await sequence.queue.get()
                if delta.error is not None:
                    raise GenerationError(f"generation failed: {delta.error}")
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            sequence.cancelled = True
            self.worker.wake()

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins."""
        text: str = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return text

    def describe(self) -> dict[str, Any]:
        return {
            "active_sequences": len(self._active),
            "queued_sequences": len(self._incoming),
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "cached_tokens": self.cached_tokens,
            "sequences_alone": self.alone,
            "handoffs": self.handoffs,
            "prompt_cache_entries": len(self.prompt_cache) if self.prompt_cache is not None else 0,
            "cache_bytes": self.cache_bytes,
        }

    # --- worker side -----------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._incoming or self._active)

    def step(self) -> None:
        try:
            self._step()
        finally:
            post(self._outbox)
            self._outbox = []

    def _step(self) -> None:
        self._admit()
        self._drop_cancelled()
        if not self._active:
            return
        self.steps += 1
        try:
            responses = self._next()
        except Exception as exc:  # a failed step fails every sequence in it, the engine goes on
            for sequence in self._active.values():
                self._outbox.append((sequence, failure(sequence, exc)))
            self._remove(list(self._active))
            self._active.clear()
            return
        for uid, token, finish_reason, logprobs in responses:
            if (active := self._active.get(uid)) is not None:
                self._deliver(active, token, finish_reason, logprobs)

    def close(self) -> None:
        self.generator.close()
        self._solo = None
        del self.generator, self.model, self.prompt_cache

    def trim_cache(self, max_bytes: int) -> None:
        if self.prompt_cache is None or self.cache_bytes <= max_bytes:
            return
        live = self.cache_bytes - self.prompt_cache.nbytes
        self.prompt_cache.trim_to(n_bytes=max(0, max_bytes - live))
        self._count_cache()
        mx.clear_cache()

    # --- the batch ---------------------------------------------------------------------------------------------

    def _make_generator(self) -> Any:
        return ContinuousBatch(
            self.model,
            stop_tokens=sorted(self.tokenizer.eos_token_ids),
            max_batch_size=self.spec.max_batch_size,
            group_size=self.spec.prefill_batch_size,
            prefill_step_size=self.spec.prefill_step_size,
        )

    def _insert(self, sequence: Sequence, sampler: Any, processors: list[Any]) -> int:
        prompt = sequence.prompt
        cache, rest = self._cached_prefix(prompt)
        cached = sequence.cached_tokens = len(prompt) - len(rest)
        self.cached_tokens += cached
        uid: int = self.generator.insert(rest, cache, prompt[:cached], sampler, processors, sequence.params.max_tokens)
        return uid

    def _next(self) -> list[tuple[int, int, str | None, Any]]:
        """One step: (uid, token, finish reason, log probabilities) per sequence that produced a token."""
        if self._solo is not None:
            return self._solo_step()
        if self.worker.waits_in_pieces:  # the last step's pieces, and its tokens while it hands the worker over
            self.cut.wait(self.generator.in_flight() if self.worker.hands_over else [])
        _, responses = self.generator.next()
        finished = [r for r in responses if r.finish_reason is not None and r.prompt_cache is not None]
        if self.prompt_cache is not None and finished:
            # Only as many as the cache keeps. A finished sequence's cache is a lazy slice of the whole batch's
            # KV: evaluated now, it stops holding that (far larger) buffer, and its bytes are what is counted.
            for r in finished[-self.prompt_cache.max_size :]:
                mx.async_eval([c.state for c in r.prompt_cache])  # type: ignore[no-untyped-call]
                self.prompt_cache.insert_cache(self.spec.name, list(r.all_tokens), r.prompt_cache)
            self._count_cache()
        return [(r.uid, r.token, r.finish_reason, r.logprobs) for r in responses]

    def _cached_prefix(self, prompt: list[int]) -> tuple[Any, list[int]]:
        """The cached KV of the longest known prefix of `prompt` (a copy), and the tokens still to read."""
        if self.prompt_cache is None:
            return None, prompt
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(self.spec.name, prompt)
        if cache is not None and not rest:  # the whole prompt is cached: read its last token again for logits
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, list(rest)

    def _costly(self) -> bool:
        """Whether this step's forward pass is worth cutting into pieces: every batch step where the worker waits in
        pieces, else the batch steps that change the batch or read prompts (engines/batching.py). mlx-vlm's generator
        does not say, so its steps stay whole, and a lone sequence's steps are one row: never."""
        if self._solo is not None or not hasattr(self.generator, "costly"):
            return False
        return self.worker.waits_in_pieces or bool(self.generator.costly)

    def _count_cache(self) -> None:
        """Publish the bytes of the prompt cache and of the KV of sequences in flight."""
        if not self.reuses_prompts:
            return
        cached = self.prompt_cache.nbytes if self.prompt_cache is not None else 0
        alone = self._solo.nbytes if self._solo is not None else 0
        self.cache_bytes = cached + self.generator.nbytes + alone

    def _remove(self, uids: list[int]) -> None:
        if SOLO in uids:
            self._solo = None
            uids = [uid for uid in uids if uid != SOLO]
        if uids:
            self.generator.remove(uids)

    # --- one sequence alone ----------------------------------------------------------------------------------

    def _start_solo(self, sequence: Sequence, sampler: Any, processors: list[Any]) -> int:
        prompt = sequence.prompt
        cache, rest = self._cached_prefix(prompt)
        sequence.cached_tokens = len(prompt) - len(rest)
        self.cached_tokens += sequence.cached_tokens
        p = sequence.params
        self._solo = SoloDecoder(
            self.model, prompt, cache, rest, sampler, processors, p.max_tokens, self.spec.prefill_step_size
        )
        self.alone += 1
        return SOLO

    def _solo_step(self) -> list[tuple[int, int, str | None, Any]]:
        solo = self._solo
        assert solo is not None
        produced = solo.step()
        if produced is None:  # still reading the prompt
            return []
        token, logprobs = produced
        finish = self._finish_of(token, solo)
        if finish is not None:
            self._solo = None
            if self.prompt_cache is not None:
                self.prompt_cache.insert_cache(self.spec.name, solo.in_cache, solo.cache)
            self._count_cache()
        return [(SOLO, token, finish, logprobs)]

    def _finish_of(self, token: int, solo: SoloDecoder) -> str | None:
        if token in self.tokenizer.eos_token_ids:
            return "stop"
        return "length" if len(solo.tokens) >= solo.max_tokens else None

    def _handoff(self) -> None:
        """Another sequence arrives: the one decoding alone joins the batch, with its KV cache."""
        solo, self._solo = self._solo, None
        assert solo is not None
        self.handoffs += 1
        state = solo.handoff()
        sequence = self._active[SOLO]
        if state.produced is not None:
            token, logprobs = state.produced
            self._deliver(sequence, token, self._finish_of(token, solo), logprobs)
        if SOLO not in self._active:  # that token ended it
            return
        uid = self.generator.insert(
            state.to_read, state.cache, state.cached_tokens, solo.sampler, solo.processors,
            solo.max_tokens - len(solo.tokens),
        )  # fmt: skip
        sequence.uid = uid
        self._active[uid] = self._active.pop(SOLO)

    # --- sequences ---------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        from mlx_lm.sample_utils import make_logits_processors

        room = ADMITS_PER_STEP - (self._solo is not None)  # a sequence decoding alone is handed over too
        admitted = bool(self._incoming)
        while self._incoming and room > 0:
            sequence = self._incoming.popleft()
            if sequence.cancelled:
                continue
            p = sequence.params
            if p.seed is not None:
                mx.random.seed(p.seed)
            sampler = shared_sampler(p.temperature, p.top_p, p.min_p, p.top_k)
            processors = make_logits_processors(
                repetition_penalty=p.repetition_penalty,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
            )
            try:
                if p.grammar is not None:
                    processors.append(GrammarProcessor(p.grammar, self._grammar_tokenizer(), self.vocab_size))
                if self._solo is not None:
                    self._handoff()
                if self.decodes_alone and not self._active and not self._incoming:
                    sequence.uid = self._start_solo(sequence, sampler, processors)
                else:
                    sequence.uid = self._insert(sequence, sampler, processors)
                    room -= 1
            except Exception as exc:  # this request's input could not be read; the others go on
                self._outbox.append((sequence, failure(sequence, exc)))
                continue
            self._active[sequence.uid] = sequence
        if admitted:
            self._count_cache()

    def _grammar_tokenizer(self) -> Any:
        if self._llg_tokenizer is None:
            self._llg_tokenizer = llg_tokenizer(self.tokenizer, self.vocab_size)
        return self._llg_tokenizer

    def _drop_cancelled(self) -> None:
        gone = [uid for uid, sequence in self._active.items() if sequence.cancelled]
        if gone:
            self._remove(gone)
            for uid in gone:
                del self._active[uid]

    def _deliver(self, sequence: Sequence, token: int, finish: str | None, logprobs: Any) -> None:
        if sequence.params.logprobs is not None and finish != "stop":
            sequence.logprobs.append(self._logprob(token, logprobs, sequence.params.logprobs))
        self._advance(sequence, token, finish)

    def _advance(self, sequence: Sequence, token: int, finish: str | None) -> None:
        sequence.tokens += 1
        self.generated_tokens += 1
        detokenizer = sequence.detokenizer
        if finish != "stop":  # an end-of-sequence token is not text
            detokenizer.add_token(token)
        if finish is not None:  # the generator has already let go of this sequence
            detokenizer.finalize()
        text = detokenizer.text
        end = len(text)
        stops = sequence.params.stop
        stop_at = min((i for s in stops if (i := text.find(s, max(0, sequence.emitted - len(s)))) >= 0), default=-1)
        if stop_at >= 0:
            if finish is None:
                self._remove([sequence.uid])  # type: ignore[list-item]
            end, finish = stop_at, "stop"
        elif finish is None and stops:
            end -= max(len(s) for s in stops) - 1  # hold back what may be the start of a stop string
        if finish is not None:
            del self._active[sequence.uid]  # type: ignore[arg-type]
        if end > sequence.emitted or finish is not None:
            piece = text[sequence.emitted : max(end, sequence.emitted)]
            logprobs = tuple(sequence.logprobs)
            delta = Delta(
                piece, finish, sequence.tokens, logprobs, None, sequence.prompt_tokens, sequence.cached_tokens
            )
            self._outbox.append((sequence, delta))
            sequence.emitted = max(end, sequence.emitted)
            sequence.logprobs = []

    def _logprob(self, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        """The token's log probability and the `top` most likely tokens at that step."""
        alternatives: tuple[tuple[str, float], ...] = ()
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            pairs: list[tuple[int, float]] = list(zip(ids.tolist(), logprobs[ids].tolist(), strict=True))  # type: ignore[arg-type]
            ranked = sorted(pairs, key=lambda pair: -pair[1])
            alternatives = tuple((self.tokenizer.decode([i]), v) for i, v in ranked)
        chosen: float = logprobs[token].item()  # type: ignore[assignment]
        return TokenLogprob(self.tokenizer.decode([token]), chosen, alternatives)


def load_chat(spec: ModelSpec, path: Path, worker: Worker) -> Task[ChatEngine]:
    """Load lazily with mlx-lm, materialize the weights a slice per step, then warm up (engines/warmup.py)."""
    from mlx_lm import load

    model, tokenizer = load(str(path), lazy=True)[:2]
    yield
    yield from materialize(model)
    config = json.loads((path / "config.json").read_text())
    engine = ChatEngine(model, tokenizer, spec, config, worker)
    if spec.warmup:
        done = yield from warm_up(engine)
        log.info("model %r warmed up: %d tokens in %d steps, %.2f s", spec.name, done.tokens, done.steps, done.seconds)
    return engine


__all__ = ["SOLO", "ChatEngine", "Delta", "SamplingParams", "Sequence", "TokenLogprob", "load_chat"]
