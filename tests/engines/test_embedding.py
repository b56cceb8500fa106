"""The embedding engine on the worker: micro-batch bounds, and dropping the work of a client that went away."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest

from mlxpool.config import ModelSpec
from mlxpool.engines.embedding import EmbeddingEngine, load_embedding
from mlxpool.worker import Task, Worker


async def load(worker: Worker, path: Path, **options: int) -> EmbeddingEngine:
    spec = ModelSpec.model_validate({"name": "m", "kind": "embedding", "path": str(path), **options})
    engine, allocated = await worker.run(load_embedding(spec, path, worker))
    assert allocated > 0
    worker.add_engine(engine)
    return engine


async def hold(worker: Worker) -> tuple[threading.Event, asyncio.Future[tuple[None, int]]]:
    """Block the worker inside one step until the returned event is set."""
    gate = threading.Event()

    def busy() -> Task[None]:
        gate.wait(timeout=10)
        return
        yield

    job = asyncio.ensure_future(worker.run(busy()))
    await asyncio.sleep(0.01)
    return gate, job


async def test_batches_respect_size_and_token_bounds(worker: Worker, tiny_models: dict[str, Path]) -> None:
    engine = await load(worker, tiny_models["bert"], max_batch_size=4, max_batch_tokens=40)
    short = engine.tokenize(["drums."])[0]
    long = engine.tokenize(["a man is eating a piece of bread. " * 3])[0]
    assert len(long) * 2 > 40 >= len(long) and len(short) * 4 <= 40
    gate, job = await hold(worker)
    shorts = [asyncio.ensure_future(engine.embed([short])) for _ in range(10)]
    longs = [asyncio.ensure_future(engine.embed([long])) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*shorts, *longs, job)
    # 10 short ones fit 4 per pass (3 passes); each long one needs a pass of its own (3 passes).
    assert engine.batches == 6


async def test_cancelled_request_is_dropped_at_the_next_step(worker: Worker, tiny_models: dict[str, Path]) -> None:
    engine = await load(worker, tiny_models["bert"], max_batch_size=2)
    ids = engine.tokenize(["drums."])[0]
    gate, job = await hold(worker)
    abandoned = asyncio.ensure_future(engine.embed([ids] * 20))
    kept = asyncio.ensure_future(engine.embed([ids]))
    await asyncio.sleep(0.01)
    abandoned.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await abandoned  # the cancellation lands in the task before the worker moves on
    gate.set()
    result = await kept
    await job
    assert result.shape == (1, 32)
    assert engine.batches == 1  # the 20 abandoned sequences never reached a forward pass
    assert not engine.has_work()


async def test_all_mlx_work_runs_on_the_worker(
    worker: Worker, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await load(worker, tiny_models["qwen3"])
    threads: set[str] = set()
    forward = engine._forward

    def spy(sequences: list[list[int]]) -> object:
        threads.add(threading.current_thread().name)
        return forward(sequences)

    monkeypatch.setattr(engine, "_forward", spy)
    await engine.embed(engine.tokenize(["hello", "world"]))
    assert threads == {"mlx-worker"}


def test_batch_shapes_round_up_only_when_bucketing() -> None:
    from mlxpool.engines.embedding import batch_shape

    assert batch_shape(5, 17, bucket=False) == (5, 17)
    assert batch_shape(5, 17, bucket=True) == (8, 32)
    assert batch_shape(1, 16, bucket=True) == (1, 16)
    assert batch_shape(64, 1, bucket=True) == (64, 16)


@pytest.mark.parametrize("model", ["bert", "qwen3"])
async def test_bucketed_batches_give_the_same_vectors(worker: Worker, tiny_models: dict[str, Path], model: str) -> None:
    engine = await load(worker, tiny_models[model])
    sequences = engine.tokenize(["drums.", "a man is eating a piece of bread.", "a monkey"])
    exact = await engine.embed(sequences)
    engine.bucket_shapes = True  # as on a GPU: 3 rows of ~12 tokens run as 4 x 16
    bucketed = await engine.embed(sequences)
    assert bucketed.shape == exact.shape and np.isfinite(bucketed).all()
    np.testing.assert_allclose(bucketed, exact, atol=2e-3)


@pytest.mark.parametrize("warmup", [True, False])
async def test_a_load_runs_one_forward_pass_to_warm_up_unless_told_not_to(
    worker: Worker, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, warmup: bool
) -> None:
    shapes: list[list[int]] = []
    forward = EmbeddingEngine._forward

    def spy(engine: EmbeddingEngine, sequences: list[list[int]]) -> np.ndarray:
        shapes.append([len(s) for s in sequences])
        return forward(engine, sequences)

    monkeypatch.setattr(EmbeddingEngine, "_forward", spy)
    engine = await load(worker, tiny_models["qwen3"], warmup=warmup)
    assert len(shapes) == (1 if warmup else 0)
    if warmup:
        assert len(set(shapes[0])) == 2  # two lengths: the padding mask's kernels too
    assert engine.batches == 0 and engine.sequences == 0
