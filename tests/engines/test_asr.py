"""The transcription engine's path for non-Whisper mlx-audio models (Parakeet, Qwen3-ASR, ...): fixed 30 s
windows, one `generate` call per worker step, segment times offset by the window, options passed only where the
model's `generate` takes them. A stand-in model records its calls (no such weights exist offline)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np

from mlxpool.config import ModelSpec
from mlxpool.engines.asr import AsrEngine, TranscribeOptions
from mlxpool.worker import Worker


class SentenceModel:
    """Like Qwen3-ASR's output: sentences with times inside the window, language as a list."""

    sample_rate = 16000

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []

    def generate(self, audio: mx.array, language: str | None = None) -> Any:
        seconds = audio.shape[0] / self.sample_rate
        self.calls.append((seconds, {"language": language}))
        segments = [{"start": 0.5, "end": seconds - 0.5, "text": f" window {len(self.calls)}"}]
        return SimpleNamespace(text=segments[0]["text"], segments=segments, language=["en"])


async def test_other_models_go_thirty_seconds_per_step(worker: Worker) -> None:
    model = SentenceModel()
    engine = AsrEngine(model, ModelSpec(name="asr", kind="asr", path="/x"), worker)
    worker.add_engine(engine)
    audio = np.zeros(16000 * 70, np.float32)  # 70 s: windows of 30, 30 and 10 s
    windows = [w async for w in engine.transcribe(audio, TranscribeOptions(language="en", temperature=0.2))]
    assert [round(seconds) for seconds, _ in model.calls] == [30, 30, 10]
    assert all(options == {"language": "en"} for _, options in model.calls)  # temperature: not a parameter here
    starts = [(s.start, s.end, s.text) for w in windows for s in w.segments]
    assert starts == [(0.5, 29.5, "window 1"), (30.5, 59.5, "window 2"), (60.5, 69.5, "window 3")]
    assert {w.language for w in windows} == {"en"} and engine.windows == 3
