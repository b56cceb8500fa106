"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from mlxpool.api.disconnect import run_until_disconnect
from mlxpool.api.errors import parse_body_or_raise
from mlxpool.api.metrics import count_tokens
from mlxpool.api.offload import run_off_loop_if_large
from mlxpool.api.responses import ArrayJSONResponse
from mlxpool.api.schemas import EmbeddingRequest
from mlxpool.engines.embedding import EmbeddingEngine
from mlxpool.errors import InvalidRequestError, UnsupportedKindError
from mlxpool.pool import ModelPool


async def create_embeddings(request: Request) -> Response:
    body = await parse_body_or_raise(request, EmbeddingRequest)
    pool: ModelPool = request.app.state.pool
    entry = pool.resolve(body.model, "embedding")
    request.state.model = entry.spec.name  # for the request log and the metrics
    if entry.spec.kind != "embedding":
        raise UnsupportedKindError(
            f"model {entry.spec.name!r} is a {entry.spec.kind} model; /v1/embeddings needs an embedding model",
            param="model",
        )
    inputs = inputs_or_raise(body.input)
    vectors, tokens = await run_until_disconnect(request, _embed(pool, body, inputs))
    # OpenAI API reference: Embeddings → The embedding object, in a list with `model` and `usage`. Built as plain
    # dicts around numpy rows: validating 1024-float lists with pydantic cost more than the forward pass.
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    count_tokens(request, entry.spec.name, usage)
    request.state.tokens = tokens
    return ArrayJSONResponse({"object": "list", "data": data, "model": entry.spec.name, "usage": usage})


async def _embed(
    pool: ModelPool, body: EmbeddingRequest, inputs: list[str] | list[list[int]]
) -> tuple[np.ndarray, int]:
    async with pool.acquire(body.model) as engine:
        assert isinstance(engine, EmbeddingEngine)
        if body.dimensions is not None and body.dimensions > engine.dimensions:
            raise InvalidRequestError(
                f"dimensions is {body.dimensions}, but model {engine.spec.name!r} has {engine.dimensions}",
                param="dimensions",
            )
        if isinstance(inputs[0], str):
            sequences = await run_off_loop_if_large(lambda: engine.tokenize(inputs), sum(map(len, inputs)))
        else:
            sequences = engine.wrap_ids(inputs)
        engine.check_lengths(sequences)
        vectors = await engine.embed(sequences)
    return truncate(vectors, body.dimensions), sum(len(s) for s in sequences)


def inputs_or_raise(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """The request's inputs as a list of strings or a list of token-id lists; empty inputs are a 400."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise InvalidRequestError("input must not be an empty list", param="input")
    if isinstance(value[0], int):
        return [value]
    for i, item in enumerate(value):
        if len(item) == 0:
            raise InvalidRequestError(f"input[{i}] is empty", param="input")
    return value


def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and renormalize (Matryoshka-style shortening)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    short = vectors[:, :dimensions]
    norms = np.linalg.norm(short, axis=1, keepdims=True)
    result: np.ndarray = short / np.maximum(norms, 1e-12)
    return result


def _encode(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32)
