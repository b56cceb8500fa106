"""Embeddings over mlx-embeddings (BERT family, Qwen3-Embedding with last-token pooling).

Concurrent requests share one queue of sequences; each worker step embeds one micro-batch of them, bounded by
sequence count and padded tokens, so many small requests cost one forward pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxpool.config import ModelSpec
from mlxpool.engines.weights import materialize
from mlxpool.errors import ContextLengthError, InvalidRequestError
from mlxpool.worker import Task, Worker, deliver

# Models whose pooled token is the last one: every sequence must end with the end-of-text token.
LAST_TOKEN_POOLED = {"qwen3"}


@dataclass(eq=False)
class EmbedRequest:
    sequences: list[list[int]]
    future: asyncio.Future[np.ndarray]
    vectors: list[np.ndarray | None] = field(default_factory=list)
    pending: int = 0
    cancelled: bool = False


class EmbeddingEngine:
    def __init__(self, model: Any, tokenizer: Any, spec: ModelSpec, config: dict[str, Any], worker: Worker):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.worker = worker
        self.model_type = str(config.get("model_type", ""))
        self.dimensions = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.max_tokens = spec.max_input_tokens or _context_limit(config, tokenizer)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.prefix, self.suffix = special_frame(tokenizer)
        # GPU backends compile kernels for each new shape (tens of ms on CUDA): run a few shapes only.
        self.bucket_shapes = mx.default_device().type == mx.gpu
        self._queue: deque[tuple[EmbedRequest, int]] = deque()
        self.batches = 0
        self.sequences = 0
        self.busy_seconds = 0.0

    # --- loop side -------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the model's special tokens (plain CPU work: call it off the loop, not on the worker)."""
        encoded = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [self._finish(list(ids)) for ids in encoded]

    def wrap_ids(self, ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Client-given token ids, checked against the vocabulary and given the model's special tokens."""
        out = []
        for i, seq in enumerate(ids):
            bad = next((t for t in seq if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{i}] has token id {bad}, outside this model's vocabulary (0..{self.vocab_size - 1})",
                    param="input",
                )
            out.append(self._finish([*self.prefix, *seq, *self.suffix]))
        return out

    def check_lengths(self, sequences: Sequence[Sequence[int]]) -> None:
        for i, seq in enumerate(sequences):
            if len(seq) > self.max_tokens:
                raise ContextLengthError(
                    f"input[{i}] is {len(seq)} tokens; model {self.spec.name!r} accepts at most "
                    f"{self.max_tokens} tokens per input",
                    param="input",
                )

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        """Normalized embeddings, one row per sequence. Cancelling drops the rest of the work at the next step."""
        request = EmbedRequest(sequences, asyncio.get_running_loop().create_future())
        request.vectors = [None] * len(sequences)
        request.pending = len(sequences)
        self._queue.extend((request, i) for i in range(len(sequences)))
        self.worker.wake()
        try:
            return await request.future
        finally:
            request.cancelled = True  # done or abandoned: either way nothing more to compute

    def describe(self) -> dict[str, Any]:
        return {
            "queued_sequences": len(self._queue),
            "batches": self.batches,
            "sequences": self.sequences,
            "busy_seconds": round(self.busy_seconds, 4),
            "dimensions": self.dimensions,
        }

    # --- worker side -----------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._queue)

    def step(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        started = time.perf_counter()
        try:
            vectors = self._forward([request.sequences[i] for request, i in batch])
        except Exception as exc:
            for request, _ in batch:
                request.cancelled = True
                deliver(request.future, error=exc)
            return
        finally:
            self.busy_seconds += time.perf_counter() - started
        self.batches += 1
        self.sequences += len(batch)
        for (request, i), vector in zip(batch, vectors, strict=True):
            request.vectors[i] = vector
            request.pending -= 1
            if request.pending == 0:
                deliver(request.future, np.stack(request.vectors))  # type: ignore[arg-type]

    def close(self) -> None:
        del self.model
        self._queue.clear()

    cache_bytes = 0  # nothing grows with use

    def trim_cache(self, max_bytes: int) -> None:
        pass

    def _take_batch(self) -> list[tuple[EmbedRequest, int]]:
        batch: list[tuple[EmbedRequest, int]] = []
        longest = 0
        while self._queue and len(batch) < self.spec.max_batch_size:
            request, i = self._queue[0]
            if request.cancelled:
                self._queue.popleft()
                continue
            longest_if_added = max(longest, len(request.sequences[i]))
            if batch and longest_if_added * (len(batch) + 1) > self.spec.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            longest = longest_if_added
        return batch

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        rows, width = batch_shape(len(sequences), max(len(s) for s in sequences), self.bucket_shapes)
        width = min(width, self.max_tokens)
        # Right padding: mlx-embeddings returns NaN for left-padded Qwen3 batches. Filler rows get one unmasked
        # token so no row is fully masked.
        ids = np.full((rows, width), self.pad_id, dtype=np.int32)
        mask = np.zeros((rows, width), dtype=np.int32)
        mask[:, 0] = 1
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        output = self.model(mx.array(ids), attention_mask=mx.array(mask))
        embeds = output.text_embeds[: len(sequences)].astype(mx.float32)
        mx.eval(embeds)
        return np.array(embeds)

    def _finish(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if self.model_type in LAST_TOKEN_POOLED and eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids


def load_embedding(spec: ModelSpec, path: Path, worker: Worker) -> Task[EmbeddingEngine]:
    """Load lazily, then materialize the weights a slice per step so other models keep their turns."""
    from mlx_embeddings.utils import load

    model, tokenizer = load(str(path), lazy=True)
    yield
    yield from materialize(model)
    config = json.loads((path / "config.json").read_text())
    engine = EmbeddingEngine(model, tokenizer, spec, config, worker)
    if spec.warmup:  # one batch of two lengths: its kernels compile now, not in the first request
        yield
        engine._forward([engine.wrap_ids([[engine.pad_id] * 3])[0], engine.wrap_ids([[engine.pad_id]])[0]])
    return engine


def batch_shape(rows: int, width: int, bucket: bool) -> tuple[int, int]:
    """The shape a batch runs at: as is, or rounded up to a power of two rows and a multiple of 16 tokens."""
    if not bucket:
        return rows, width
    return 1 << (rows - 1).bit_length(), -(-width // 16) * 16


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (`[CLS]` ... `[SEP]` for BERT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
    return list(full[:at]), list(full[at + len(bare) :])


def _context_limit(config: dict[str, Any], tokenizer: Any) -> int:
    limits = [int(config["max_position_embeddings"])] if "max_position_embeddings" in config else []
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**7:
        limits.append(model_max)
    return min(limits) if limits else 512
