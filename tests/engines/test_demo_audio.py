"""The tiny speech models load through mlx-audio's public loaders and run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlxpool.demo_audio import KITTEN_VOICE, build_tiny_kitten_tts, build_tiny_whisper

MAX_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-audio")
    return {"whisper": build_tiny_whisper(root / "whisper"), "kitten": build_tiny_kitten_tts(root / "kitten")}


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_tiny_whisper(models: dict[str, Path]) -> None:
    from mlx_audio.stt import load
    from mlx_audio.stt.models.whisper import Model
    from mlx_audio.stt.models.whisper.audio import SAMPLE_RATE

    assert size(models["whisper"]) < MAX_BYTES
    model = load(models["whisper"])
    assert isinstance(model, Model)
    # Whisper has no sample_rate attribute: its rate is the module constant, also in the feature extractor.
    assert SAMPLE_RATE == model._processor.feature_extractor.sampling_rate == 16000
    tokenizer = model.get_tokenizer()
    assert tokenizer.eot < tokenizer.sot < tokenizer.timestamp_begin  # text ids, then specials, then timestamps
    result = model.generate(tone(2, SAMPLE_RATE), temperature=0.0)
    assert result.language == "en"
    assert result.segments and {"start", "end", "text", "avg_logprob", "no_speech_prob"} <= set(result.segments[0])


def test_tiny_kitten_tts(models: dict[str, Path]) -> None:
    from mlx_audio.tts import load
    from mlx_audio.tts.models.kitten_tts import Model

    assert size(models["kitten"]) < MAX_BYTES
    model = load(models["kitten"])
    assert isinstance(model, Model)
    assert model.sample_rate == 24000
    assert list(model.voices) == [KITTEN_VOICE]
    chunks = [np.array(r.audio) for r in model.generate("Hello world.", voice=KITTEN_VOICE)]
    assert len(chunks) == 1
    assert chunks[0].ndim == 1 and 0.1 * model.sample_rate < chunks[0].size < 10 * model.sample_rate
    assert np.isfinite(chunks[0]).all() and np.abs(chunks[0]).max() > 0.01
