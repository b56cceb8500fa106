"""Continuous batching for text models, with newcomers admitted a bounded piece per worker step.

mlx-lm's `BatchGenerator` does a whole admission inside one step: merging the newcomers' caches, reading their
prompts (a chunk per row) and their first token, on top of that step's decode. On a GPU that made the worker's
longest steps 80-170 ms (bench/join_cost.py, docs/benchmarks.md), and every other model waited for them. Here the
same mlx-lm parts (`PromptProcessingBatch`, `GenerationBatch`) are driven so that a step is either a decode step
of the running batch or one piece of admitting the next group: merging up to `ROWS_PER_PIECE` newcomers' cached
prefixes into the group, reading `prefill_step_size` of the group's prompt tokens, or the group's first token and its
joining the running batch. While sequences are decoding, pieces go back to back for at most `DECODE_GAP` seconds
after the last decode step, so a burst of newcomers joins in one go (as mlx-lm's generator admits them) while the
running sequences wait at most that long for their next token; a piece that runs longer alternates with decode steps.

Every change to the running batch rewrites every layer's cache, and the decode step after it took twice as long
as a steady one on a GPU (bench/batch_churn.py). So sequences that finish stay in the batch, decoding unseen, until
they are a quarter of it or a group joins (`RunningBatch`): in a busy server one change then does for both.
"""

# mypy: disallow-untyped-calls=False
# (mlx-lm's caches and batches have no type hints)
from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch, StopSequences, generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.utils import maybe_set_recommended_wired_limit

from mlxpool.engines.kv import as_rows

ROWS_PER_PIECE = 8
"""Cached prefixes that one step merges into the group (each costs two copies per layer; rows without one cost
nothing, and rows with the same prefix of one prompt cache entry are copied together)."""
DECODE_GAP = 0.05
"""Seconds that admission pieces may go on back to back while sequences wait for their next decode step."""
CLEAR_EVERY = 512
"""Decode steps between returns of MLX's buffer cache, as mlx-lm's generator does."""
GONE = -1
"""The uid of a row whose sequence has finished or was removed, until the batch drops it."""
NEVER = StopSequences([])


class RunningBatch(GenerationBatch):
    """mlx-lm's `GenerationBatch` whose finished (or removed) rows stay, decoding unseen, until they are a quarter
    of the rows or a group joins; then all are dropped in one change. `len()` counts the live rows."""

    gone = 0
    changed = False
    """Rows joined or left since the last decode step: the next one rewrites every layer's cache."""

    def __len__(self) -> int:
        return len(self.uids) - self.gone

    def filter(self, keep: list[int]) -> None:
        """Mark the rows not in `keep` gone: they never stop, run no logits processors, and sample with a live row's
        sampler (one sampler for the whole batch is one batched call)."""
        kept = set(keep)
        samplers = self.samplers or []
        live = next((samplers[i] for i in keep if self.uids[i] != GONE), None) if samplers else None
        for i, uid in enumerate(self.uids):
            if i not in kept and uid != GONE:
                self.uids[i], self.max_tokens[i], self._matchers[i] = GONE, sys.maxsize, NEVER.matcher()
                if self.logits_processors:
                    self.logits_processors[i] = []
                if live is not None:
                    samplers[i] = live
                self.gone += 1
        if 4 * self.gone >= len(self.uids):
            self.compact()

    def compact(self) -> None:
        """Drop the rows that are gone."""
        if self.gone:
            self.gone, self.changed = 0, True
            super().filter([i for i, uid in enumerate(self.uids) if uid != GONE])

    def extend(self, batch: Any) -> None:
        self.compact()
        super().extend(batch)
        self.changed = True


@dataclass
class Newcomer:
    uid: int
    cache: list[Any]
    cached: list[int]
    """The tokens whose KV `cache` holds."""
    to_read: list[int]
    """The prompt's tokens after those (at least one: the last is read with the first decode)."""
    sampler: Any
    processors: list[Any]
    max_tokens: int


@dataclass
class Group:
    """Newcomers reading their prompts together, to join the running batch as one."""

    rows: list[Newcomer] = field(default_factory=list)
    batch: Any = None
    """Their `PromptProcessingBatch`."""
    reading: bool = False
    """Reading has begun: the group takes no more rows."""


class ContinuousBatch:
    def __init__(
        self, model: Any, stop_tokens: list[int], max_batch_size: int, group_size: int, prefill_step_size: int,
        clock: Callable[[], float] = time.perf_counter,
    ):  # fmt: skip
        self.model = model
        self.stops = StopSequences([[t] for t in stop_tokens])
        self.max_batch_size = max_batch_size
        self.group_size = group_size
        self.prefill_step_size = prefill_step_size
        self.running: Any = RunningBatch.empty(model, greedy_sampler)
        self.waiting: deque[Newcomer] = deque()
        self.group = Group()
        self.decode_steps = 0
        self.joins = 0
        """Groups that joined the running batch."""
        self._clock = clock
        self._decoded_at = 0.0
        """When the last decode step ended."""
        self._pieces = 0
        """Admission pieces since then."""
        self._owed = False
        """The running batch has first tokens to hand out: it decodes next."""
        self.costly = False
        """The step running now is an admission piece or the decode step after the batch changed: its forward pass
        is cut into pieces while other models have work (engines/pieces.py)."""
        self._uids = itertools.count()
        self._wired = maybe_set_recommended_wired_limit()

    def insert(
        self, to_read: list[int], cache: list[Any] | None, cached: list[int], sampler: Any, processors: list[Any],
        max_tokens: int,
    ) -> int:  # fmt: skip
        """Queue a sequence: `cache` holds the KV of `cached`, `to_read` (not empty) follows. Returns its uid."""
        if not to_read or max_tokens <= 0:
            raise ValueError("a sequence needs a token to read and max_tokens > 0")
        cache = as_rows(cache if cache is not None else make_prompt_cache(self.model))
        uid: int = next(self._uids)
        self.waiting.append(Newcomer(uid, cache, list(cached), list(to_read), sampler, processors, max_tokens))
        return uid

    def remove(self, uids: list[int]) -> None:
        gone = set(uids)
        self.waiting = deque(n for n in self.waiting if n.uid not in gone)
        if keep := [i for i, n in enumerate(self.group.rows) if n.uid not in gone]:
            if len(keep) < len(self.group.rows):
                self.group.batch.filter(keep)
                self.group.rows = [self.group.rows[i] for i in keep]
        else:
            self.group = Group()
        if any(uid in gone for uid in self.running.uids):
            self.running.filter([i for i, uid in enumerate(self.running.uids) if uid not in gone])

    def next(self) -> tuple[list[int], list[Any]]:
        """One step: (uids that joined the running batch, `GenerationBatch.Response`s of a decode step)."""
        with mx.stream(generation_stream):
            admitting = (self.waiting or self.group.rows) and len(self.running) < self.max_batch_size
            due = self._owed or (self._pieces > 0 and self._clock() - self._decoded_at >= DECODE_GAP)
            if admitting and (not len(self.running) or not due):
                self._pieces += 1
                self.costly = True
                return self._admit(), []
            self.costly, self.running.changed = self.running.changed, False
            self.decode_steps += 1
            if self.decode_steps % CLEAR_EVERY == 0:
                mx.clear_cache()
            responses = [r for r in self.running.next() if r.uid != GONE]
            self._decoded_at, self._pieces, self._owed = self._clock(), 0, False
            return [], responses

    def __len__(self) -> int:
        return len(self.waiting) + len(self.group.rows) + len(self.running)

    def in_flight(self) -> list[Any]:
        """The running batch's next tokens: launched by the last decode step (or join), which the next waits for."""
        tokens = self.running._next_tokens if self.running.uids else None
        return [tokens] if tokens is not None else []

    @property
    def nbytes(self) -> int:
        waiting = sum(c.nbytes for n in self.waiting for c in n.cache)
        group = sum(c.nbytes for c in self.group.batch.prompt_cache) if self.group.batch is not None else 0
        return int(waiting + group + sum(c.nbytes for c in self.running.prompt_cache))

    def close(self) -> None:
        if self._wired is not None:
            mx.synchronize(generation_stream)
            mx.set_wired_limit(self._wired)
            self._wired = None

    # --- admission, a piece per step -----------------------------------------------------------------------------

    def _admit(self) -> list[int]:
        group = self.group
        room = min(self.group_size, self.max_batch_size - len(self.running)) - len(group.rows)
        if self.waiting and room > 0 and not group.reading:
            self._merge(sorted(self._take(room), key=_source))
        elif any(len(n.to_read) > 1 for n in group.rows):
            self._read()
        else:
            return self._join()
        return []

    def _take(self, room: int) -> list[Newcomer]:
        """The next waiting rows: at most `room`, holding at most ROWS_PER_PIECE distinct cached prefixes."""
        rows: list[Newcomer] = []
        sources: set[tuple[int, int]] = set()
        while self.waiting and len(rows) < room:
            if self.waiting[0].cached and (source := _source(self.waiting[0])) not in sources:
                if len(sources) == ROWS_PER_PIECE:
                    break
                sources.add(source)
            rows.append(self.waiting.popleft())
        return rows

    def _merge(self, rows: list[Newcomer]) -> None:
        n = len(rows)
        batch = PromptProcessingBatch(
            self.model, [r.uid for r in rows], [r.cache for r in rows], [list(r.cached) for r in rows],
            samplers=[r.sampler for r in rows], fallback_sampler=greedy_sampler,
            logits_processors=[list(r.processors) for r in rows], stop_sequences=[self.stops] * n,
            max_tokens=[r.max_tokens for r in rows],
        )  # fmt: skip
        for r in rows:
            r.cache = []  # merged: the group holds it now
        if self.group.batch is None:
            self.group.batch = batch
        else:
            self.group.batch.extend(batch)
        self.group.rows += rows
        # Launched now, the copies are this step's work, not the first token's.
        mx.async_eval([c.state for c in self.group.batch.prompt_cache if not c.empty()])

    def _read(self) -> None:
        """Read up to `prefill_step_size` prompt tokens of the group (all but each row's last token)."""
        self.group.reading = True
        rows = self.group.rows
        per_row = max(1, self.prefill_step_size // len(rows))
        chunks = [n.to_read[: min(per_row, len(n.to_read) - 1)] for n in rows]
        for n, chunk in zip(rows, chunks, strict=True):
            n.to_read = n.to_read[len(chunk) :]
        self.group.batch.prompt(chunks)

    def _join(self) -> list[int]:
        """The group's first token; it joins the running batch, whose next decode step returns that token."""
        group, self.group = self.group, Group()
        self.running.extend(group.batch.generate([n.to_read for n in group.rows]))
        self.joins += 1
        self._owed = True
        return [n.uid for n in group.rows]


def _source(row: Newcomer) -> tuple[int, int]:
    """Which cached prefix `row` holds: rows with equal sources merge in one copy."""
    first = row.cache[0] if row.cache else None
    return id(getattr(first, "keys", row)), len(row.cached)
