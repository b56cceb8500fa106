"""A text model's forward pass in pieces: the same logits, other engines stepping between pieces only while the
worker has company, and the same answers from a server whose embeddings step inside chat steps."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models import qwen3

from mlxpool.api import app
from mlxpool.demo import build_tiny_chat
from mlxpool.device import computes_on_cpu
from mlxpool.engines.chat import ChatEngine
from mlxpool.engines.pieces import EndsAPiece, cut_into_pieces, text_layers
from mlxpool.worker import Worker
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import FakeEngine


def qwen3_layers(layers: int = 8) -> qwen3.Model:
    mx.random.seed(0)
    args = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
            "tie_word_embeddings": True}  # fmt: skip
    return qwen3.Model(qwen3.ModelArgs.from_dict(args))  # type: ignore[no-untyped-call]


def test_the_cut_model_gives_the_same_logits_and_hands_over_only_with_company(monkeypatch: pytest.MonkeyPatch) -> None:
    model = qwen3_layers()
    tokens = mx.array([[1, 5, 9, 12, 3]])
    reference = model(tokens)
    worker = Worker(pieces=4)
    handovers: list[int] = []
    monkeypatch.setattr(worker, "between_pieces", lambda: handovers.append(1))
    layers = text_layers(model)
    assert layers is not None
    assert cut_into_pieces(layers, worker).ends == 3
    assert [i for i, layer in enumerate(layers) if isinstance(layer, EndsAPiece)] == [1, 3, 5]
    assert not any(isinstance(layer.self_attn, EndsAPiece) for layer in layers)  # 16 points: every 4th
    assert cut_into_pieces(layers, worker).ends == 3  # cutting again changes nothing
    assert type(layers[1]).__mro__.count(EndsAPiece) == 1

    alone = model(tokens)
    assert handovers == []
    worker.hands_over = True
    shared = model(tokens)
    assert len(handovers) == 3
    assert mx.array_equal(alone, reference) and mx.array_equal(shared, reference)


def test_one_piece_or_one_layer_is_not_cut() -> None:
    assert cut_into_pieces(text_layers(qwen3_layers()) or [], Worker(pieces=1)).ends == 0
    assert cut_into_pieces((text_layers(qwen3_layers()) or [])[:1], Worker(pieces=4)).ends == 0
    assert text_layers(object()) is None


def test_a_two_layer_model_is_cut_after_attention_too_and_waited_for_piece_by_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = qwen3_layers(2)
    tokens = mx.array([[1, 5, 9, 12, 3]])
    reference = model(tokens)
    worker = Worker(pieces=4, waits_in_pieces=True)
    layers = text_layers(model) or []
    cut = cut_into_pieces(layers, worker)
    handovers: list[int] = []
    monkeypatch.setattr(worker, "between_pieces", lambda: handovers.append(len(cut.launched)))
    assert cut.ends == 3
    assert [isinstance(m, EndsAPiece) for m in (layers[0].self_attn, layers[0], layers[1].self_attn, layers[1])] == [
        True, True, True, False,
    ]  # fmt: skip

    worker.hands_over = True
    shared = model(tokens)  # each piece is launched, kept, and handed over after
    assert handovers == [1, 2, 3] and len(cut.launched) == 3
    assert mx.array_equal(shared, reference)
    handovers.clear()
    cut.wait([shared])  # the three pieces, then the output: a handover after each
    assert handovers == [0, 0, 0, 0] and cut.launched == [] and cut.waited == 3

    worker.waits_in_pieces = False  # cut, handed over, but not kept to be waited for
    model(tokens)
    assert cut.launched == []


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("pieces") / "qwen3")


@pytest.fixture(params=[True, False], ids=["wait", "no-wait"])
async def served(
    serve: ServeFactory, tiny_chat: Path, tiny_models: dict[str, Path], request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    models: dict[str, dict[str, Any]] = {
        "chat": {"kind": "chat", "path": str(tiny_chat), "memory_reserve": "16MB", "prompt_cache_size": 0},
        "bert": {"kind": "embedding", "path": str(tiny_models["bert"]), "memory_reserve": "16MB"},
    }
    async with serve(make_settings(models, forward_pieces=2, wait_in_pieces=request.param)) as s:
        await s.pool.load("chat")
        await s.pool.load("bert")
        yield s


async def answer(s: Served, content: str) -> dict[str, Any]:
    body = {"model": "chat", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 64}
    response = await s.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_other_engines_step_inside_chat_steps_and_the_answers_stay_the_same(served: Served) -> None:
    chat = served.pool.entries["chat"].engine
    assert isinstance(chat, ChatEngine) and chat.cut.ends == 1
    worker = served.pool.worker
    assert worker.waits_in_pieces == served.app.state.settings.server.wait_in_pieces
    prompts = [f"Tell me about the sea, story {i}." for i in range(4)]
    alone = [await answer(served, p) for p in prompts]  # one at a time, with no company: never cut
    assert worker.steps_between == 0

    busy = FakeEngine("busy", None, pending=10**9)  # always has work: it steps at every cut
    worker.add_engine(busy)
    try:
        together = await asyncio.gather(*(answer(served, p) for p in prompts))
        embedded = await served.http.post("/v1/embeddings", json={"model": "bert", "input": "the sea"})
    finally:
        busy.pending = 0
        worker.remove_engine(busy)
    assert worker.steps_between > 0 and busy.threads == {"mlx-worker"}
    assert (chat.cut.waited > 0) == worker.waits_in_pieces
    assert [a["choices"] for a in together] == [a["choices"] for a in alone]
    assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) > 0


def test_the_cut_layers_do_not_keep_the_engine_alive(tiny_chat: Path) -> None:
    """An engine whose model's layers referred back to it would be a reference cycle: freed only by a full
    garbage collection, which an unload runs only when memory did not come back (worker.release_memory)."""
    from mlx_lm import load

    from mlxpool.config import ModelSpec

    model, tokenizer = load(str(tiny_chat))[:2]
    spec = ModelSpec(name="tiny", kind="chat", path=str(tiny_chat))
    engine = ChatEngine(model, tokenizer, spec, {}, Worker(pieces=4))
    assert engine.cut.ends == 3
    gone = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("setting", "cpu", "waits"),
    [("auto", True, True), ("auto", False, False), (True, False, True), (False, True, False)],
)
async def test_waiting_in_pieces_is_on_by_default_where_mlx_computes_on_the_cpu(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch, setting: bool | str, cpu: bool, waits: bool
) -> None:
    monkeypatch.setattr(app, "computes_on_cpu", lambda: cpu)
    async with serve(make_settings({}, wait_in_pieces=setting)) as s:
        assert s.pool.worker.waits_in_pieces is waits


def test_mlx_computes_on_the_cpu_where_it_has_no_gpu() -> None:
    assert computes_on_cpu() is not (mx.metal.is_available() or mx.cuda.is_available())
