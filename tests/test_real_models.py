"""The real-model tier: runs when MLXPOOL_REAL_MODELS names a directory of real weights (see tests/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import ServeFactory, make_settings

pytestmark = pytest.mark.real


async def test_minilm_ranks_a_paraphrase_above_unrelated_sentences(serve: ServeFactory, real_models: Path) -> None:
    path = real_models / "minilm-l6-v2"
    assert path.is_dir(), f"{path} is missing: run ../shared/models/fetch_real_weights.sh {real_models}"
    settings = make_settings({"minilm": {"kind": "embedding", "path": str(path)}})
    query = "A man is eating a piece of bread."
    candidates = [
        "A man is eating food.",
        "The girl is carrying a baby.",
        "A monkey is playing drums.",
        "Stock markets fell sharply on Monday.",
    ]
    async with serve(settings) as s:
        response = await s.openai.embeddings.create(model="minilm", input=[query, *candidates])
    vectors = np.array([d.embedding for d in response.data])
    assert vectors.shape == (5, 384)
    similarity = vectors[1:] @ vectors[0]
    assert int(np.argmax(similarity)) == 0, similarity
    assert similarity[0] > 0.5 and similarity[0] - max(similarity[1:]) > 0.2, similarity


@pytest.mark.parametrize("stream", [False, True])
async def test_smollm2_knows_the_capital_of_france(serve: ServeFactory, real_models: Path, stream: bool) -> None:
    path = real_models / "smollm2-135m-instruct"
    assert path.is_dir(), f"{path} is missing: run ../shared/models/fetch_real_weights.sh {real_models}"
    settings = make_settings({"smol": {"kind": "chat", "path": str(path)}})
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    async with serve(settings) as s:
        if stream:
            chunks = await s.openai.chat.completions.create(
                model="smol", messages=question, temperature=0, max_tokens=40, stream=True
            )
            answer = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            response = await s.openai.chat.completions.create(
                model="smol", messages=question, temperature=0, max_tokens=40
            )
            answer = response.choices[0].message.content or ""
    assert "Paris" in answer, answer
