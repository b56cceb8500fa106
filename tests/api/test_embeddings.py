"""/v1/embeddings through the real openai client, on tiny BERT and Qwen3 models built by fixtures."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.conftest import Served, ServeFactory, make_settings


@pytest.fixture
async def served(serve: ServeFactory, tiny_models: dict[str, Path]) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "qwen": {
                "kind": "embedding",
                "path": str(tiny_models["qwen3"]),
                "aliases": ["embedding"],
                "default": True,
                "preload": True,
                "memory_reserve": "16MB",
                "max_batch_size": 16,
            },
            "bert": {"kind": "embedding", "path": str(tiny_models["bert"]), "memory_reserve": "16MB"},
        },
        max_request_bytes="64KB",
    )
    async with serve(settings) as s:
        await s.wait_ready()
        yield s


async def vectors(s: Served, **kwargs: Any) -> np.ndarray:
    response = await s.openai.embeddings.create(**kwargs)
    return np.array([d.embedding for d in response.data])


@pytest.mark.parametrize("model", ["qwen", "bert", "embedding", "text-embedding-3-small"])
async def test_strings_give_normalized_vectors_and_usage(served: Served, model: str) -> None:
    response = await served.openai.embeddings.create(model=model, input=["A man is eating food.", "hello"])
    assert response.object == "list" and [d.index for d in response.data] == [0, 1]
    matrix = np.array([d.embedding for d in response.data])
    assert matrix.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 2
    assert response.model in ("qwen", "bert")


async def test_float_and_base64_encodings_agree(served: Served) -> None:
    text = "A monkey is playing drums."
    floats = await served.http.post("/v1/embeddings", json={"model": "qwen", "input": text})
    b64 = await served.http.post("/v1/embeddings", json={"model": "qwen", "input": text, "encoding_format": "base64"})
    as_float = np.array(floats.json()["data"][0]["embedding"], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(as_float, decoded)


async def test_token_id_inputs_match_text_inputs(served: Served) -> None:
    engine = served.pool.entries["bert"]
    text = "a man is eating food."
    from_text = await vectors(served, model="bert", input=text)
    assert engine.engine is not None
    raw_ids = engine.engine.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[attr-defined]
    from_ids = await vectors(served, model="bert", input=raw_ids)
    from_id_lists = await vectors(served, model="bert", input=[raw_ids, raw_ids])
    np.testing.assert_allclose(from_ids[0], from_text[0], atol=1e-5)
    np.testing.assert_allclose(from_id_lists, np.stack([from_text[0]] * 2), atol=1e-5)


@pytest.mark.parametrize("model", ["qwen", "bert"])
async def test_padding_in_a_batch_does_not_change_a_vector(served: Served, model: str) -> None:
    short = "drums."
    alone = await vectors(served, model=model, input=short)
    batched = await vectors(served, model=model, input=[short, "A man is eating a piece of bread. " * 3, short])
    # Other batch shapes pick other kernels (TF32 on CUDA: ~3e-4); a padding bug moves a vector by ~0.1.
    np.testing.assert_allclose(batched[0], alone[0], atol=2e-3)
    np.testing.assert_allclose(batched[2], alone[0], atol=2e-3)


async def test_qwen3_pools_the_end_of_text_token(served: Served, tiny_models: dict[str, Path]) -> None:
    from mlx_embeddings.utils import load

    model, tokenizer = load(str(tiny_models["qwen3"]))
    ids = tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    import mlx.core as mx

    expected = np.array(model(mx.array([ids])).text_embeds)[0]
    got = await vectors(served, model="qwen", input="hello world")
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


async def test_dimensions_truncate_and_renormalize(served: Served) -> None:
    full = await vectors(served, model="qwen", input="hello")
    short = await vectors(served, model="qwen", input="hello", dimensions=8)
    assert short.shape == (1, 8)
    np.testing.assert_allclose(np.linalg.norm(short[0]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(short[0], full[0, :8] / np.linalg.norm(full[0, :8]), atol=1e-6)


async def test_concurrent_requests_are_micro_batched(served: Served) -> None:
    entry = served.pool.entries["qwen"]
    assert entry.engine is not None
    before = entry.engine.describe()["batches"]
    results = await asyncio.gather(*(vectors(served, model="qwen", input=f"sentence number {i}") for i in range(48)))
    batches = entry.engine.describe()["batches"] - before
    assert all(r.shape == (1, 32) for r in results)
    assert 3 <= batches < 48  # max_batch_size 16 bounds each pass
    alone = await vectors(served, model="qwen", input="sentence number 5")
    np.testing.assert_allclose(results[5], alone, atol=2e-3)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "qwen", "input": ""}, 400, "input", None),
        ({"model": "qwen", "input": []}, 400, "input", None),
        ({"model": "qwen", "input": ["ok", ""]}, 400, "input", None),
        ({"model": "qwen", "input": [[]]}, 400, "input", None),
        ({"model": "qwen", "input": "x " * 300}, 400, "input", "context_length_exceeded"),
        ({"model": "qwen", "input": [1, 2, 99999]}, 400, "input", None),
        ({"model": "qwen", "input": "hi", "dimensions": 33}, 400, "dimensions", None),
        ({"model": "qwen", "input": "hi", "dimensions": 0}, 400, "dimensions", None),
        ({"model": "qwen", "input": "hi", "encoding_format": "int8"}, 400, "encoding_format", None),
        ({"model": "qwen", "input": 3.5}, 400, "input", None),
        ({"input": "hi"}, 400, "model", None),
        ({"model": "nope", "input": "hi"}, 404, "model", "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_errors(
    served: Served, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    response = await served.http.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    ok = await served.http.post("/v1/embeddings", json={"model": "qwen", "input": "still up"})
    assert ok.status_code == 200


async def test_context_limit_is_named_in_the_message(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 128 tokens"):
        await served.openai.embeddings.create(model="qwen", input="x " * 300)


async def test_invalid_json_is_a_400(served: Served) -> None:
    response = await served.http.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


async def test_body_over_the_limit_is_a_413(served: Served) -> None:
    response = await served.http.post("/v1/embeddings", json={"model": "qwen", "input": ["x" * 1000] * 100})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


async def test_body_over_the_limit_without_content_length_is_a_413(served: Served) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1000

    response = await served.http.post("/v1/embeddings", content=chunks())
    assert response.status_code == 413


async def test_unexpected_failures_are_a_500_without_internals(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxpool.engines.embedding import EmbeddingEngine

    def broken(self: EmbeddingEngine, texts: list[str]) -> list[list[int]]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(EmbeddingEngine, "tokenize", broken)
    response = await served.http.post("/v1/embeddings", json={"model": "qwen", "input": "hi"})
    assert response.status_code == 500
    assert "secret" not in response.text and response.json()["error"]["type"] == "server_error"
    assert served.pool.entries["qwen"].leases == 0


async def test_unloading_a_real_engine_returns_active_memory_to_baseline(
    serve: ServeFactory, tiny_models: dict[str, Path]
) -> None:
    import mlx.core as mx

    settings = make_settings({"bert": {"kind": "embedding", "path": str(tiny_models["bert"])}})
    async with serve(settings) as s:

        async def cycle() -> tuple[int, int]:
            await vectors(s, model="bert", input=["load me", "and use me"])
            loaded = await s.pool.worker.call(mx.get_active_memory)
            assert (await s.http.post("/admin/models/bert/unload")).json()["state"] == "absent"
            return loaded, await s.pool.worker.call(mx.get_active_memory)

        await cycle()  # the first forward pass leaves a few bytes of MLX constants behind, once
        baseline = await s.pool.worker.call(mx.get_active_memory)
        for _ in range(3):
            loaded, after = await cycle()
            assert loaded - baseline >= s.pool.entries["bert"].measured > 0
            assert after == baseline
