"""The real-model tier: runs when MLXPOOL_REAL_MODELS names a directory of real weights (see tests/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


SPOKEN = (
    "Hello, my name is John. Today is a beautiful day and the sun is shining. "
    "I am going to the market to buy some bread and milk."
)


def espeak_wav(text: str) -> bytes:
    """Speech synthesized now by espeak-ng (Debian package), as a wav file."""
    import shutil
    import subprocess

    assert shutil.which("espeak-ng"), "espeak-ng is missing: apt-get install espeak-ng"
    return subprocess.run(["espeak-ng", "-s", "150", "--stdout", text], check=True, capture_output=True).stdout


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length (lower case, punctuation dropped)."""
    import re

    ref, hyp = (re.findall(r"[a-z']+", t.lower()) for t in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / len(ref)


async def test_whisper_transcribes_espeak_speech(serve: ServeFactory, real_models: Path) -> None:
    import srt  # type: ignore[import-untyped]

    path = real_models / "whisper-tiny.en"
    assert path.is_dir(), f"{path} is missing: run ../shared/models/fetch_real_weights.sh {real_models}"
    audio = espeak_wav(SPOKEN)
    async with serve(make_settings({"whisper": {"kind": "asr", "path": str(path)}})) as s:

        async def ask(response_format: str) -> Any:
            form = {"model": "whisper", "response_format": response_format, "temperature": "0"}
            response = await s.http.post(
                "/v1/audio/transcriptions", data=form, files={"file": ("speech.wav", audio)}, timeout=300
            )
            assert response.status_code == 200, response.text
            return response

        text = (await ask("json")).json()["text"]
        assert word_error_rate(SPOKEN, text) <= 0.25, text
        verbose = (await ask("verbose_json")).json()
        assert word_error_rate(SPOKEN, verbose["text"]) <= 0.25
        starts = [s["start"] for s in verbose["segments"]]
        assert starts == sorted(starts) and all(
            s["start"] <= s["end"] <= verbose["duration"] for s in verbose["segments"]
        )
        subtitles = list(srt.parse((await ask("srt")).text))
        assert [sub.start for sub in subtitles] == sorted(sub.start for sub in subtitles)
        assert word_error_rate(SPOKEN, " ".join(sub.content for sub in subtitles)) <= 0.25
