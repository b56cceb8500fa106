"""Speech to text over mlx-audio. Each worker step decodes one window of one request, round-robin, so a long
recording never holds up other requests or models. Whisper goes through `engines/whisper.py` (mlx-audio's own
long-form loop, a window per step); other mlx-audio models (Parakeet, Qwen3-ASR, ...) get fixed 30 s windows,
each a call of their `generate`."""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxpool.config import ModelSpec
from mlxpool.engines.transcript import Segment
from mlxpool.engines.weights import materialize
from mlxpool.engines.whisper import Window, float32_whisper, is_whisper, whisper_windows
from mlxpool.errors import GenerationError
from mlxpool.worker import Task, Worker

WINDOW_SECONDS = 30


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None
    """A language code (`en`), or None to detect it."""
    task: str = "transcribe"
    """`transcribe`, or `translate` (into English; Whisper only)."""
    prompt: str | None = None
    temperature: float | None = None
    """None: Whisper's fallback ladder from 0 to 1."""
    words: bool = False
    """Word timings (Whisper)."""


@dataclass(eq=False)
class Job:
    audio: np.ndarray
    options: TranscribeOptions
    queue: asyncio.Queue[Window | Exception | None] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    windows: Iterator[Window] | None = None
    cancelled: bool = False

    def send(self, item: Window | Exception | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsrEngine:
    cache_bytes = 0  # nothing grows with use

    def __init__(self, model: Any, spec: ModelSpec, worker: Worker):
        self.model = model
        self.spec = spec
        self.worker = worker
        self.whisper = is_whisper(model)
        self.sample_rate = _sample_rate(model)
        self.translates = self.whisper and bool(getattr(model, "is_multilingual", True))
        self._jobs: deque[Job] = deque()
        self.windows = 0
        self.audio_seconds = 0.0

    # --- loop side -------------------------------------------------------------------------------------------

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> AsyncGenerator[Window, None]:
        """The transcription of `audio` (mono float32 at `sample_rate`), a window at a time."""
        job = Job(audio, options)
        self._jobs.append(job)
        self.worker.wake()
        try:
            while (item := await job.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise GenerationError(f"transcription failed: {item}") from item
                yield item
        finally:
            job.cancelled = True
            self.worker.wake()

    def describe(self) -> dict[str, Any]:
        return {"queued_requests": len(self._jobs), "windows": self.windows, "audio_seconds": self.audio_seconds}

    # --- worker side -----------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._jobs)

    def step(self) -> None:
        job = self._jobs.popleft()
        if job.cancelled:
            return
        try:
            if job.windows is None:
                job.windows = self._windows(job)
            window = next(job.windows)
        except StopIteration:
            job.send(None)
            return
        except Exception as exc:  # this request fails; the engine goes on
            job.send(exc)
            return
        self.windows += 1
        job.send(window)
        self._jobs.append(job)

    def close(self) -> None:
        for job in self._jobs:
            job.send(None)
        self._jobs.clear()
        del self.model

    def trim_cache(self, max_bytes: int) -> None:
        pass

    def _windows(self, job: Job) -> Iterator[Window]:
        self.audio_seconds += len(job.audio) / self.sample_rate
        o = job.options
        if self.whisper:
            return whisper_windows(
                self.model, job.audio, language=o.language, task=o.task, prompt=o.prompt, temperature=o.temperature,
                words=o.words,
            )  # fmt: skip
        return self._fixed_windows(job.audio, o)

    def _fixed_windows(self, audio: np.ndarray, options: TranscribeOptions) -> Iterator[Window]:
        accepted = inspect.signature(self.model.generate).parameters
        kwargs = {k: v for k, v in (("language", options.language), ("temperature", options.temperature))
                  if v is not None and k in accepted}  # fmt: skip
        step = WINDOW_SECONDS * self.sample_rate
        for start in range(0, len(audio), step):
            chunk = audio[start : start + step]
            offset = start / self.sample_rate
            output = self.model.generate(mx.array(chunk), **kwargs)
            yield Window(_segments_of(output, offset, len(chunk) / self.sample_rate), [], _language_of(output, options))


def _segments_of(output: Any, offset: float, seconds: float) -> list[Segment]:
    raw = getattr(output, "segments", None) or getattr(output, "sentences", None) or []
    segments = []
    for s in raw:
        get = s.get if isinstance(s, dict) else lambda key, default=None, s=s: getattr(s, key, default)
        text = str(get("text", "")).strip()
        if text:
            segments.append(Segment(offset + float(get("start", 0.0)), offset + float(get("end", seconds)), text))
    text = str(getattr(output, "text", "")).strip()
    return segments or ([Segment(offset, offset + seconds, text)] if text else [])


def _language_of(output: Any, options: TranscribeOptions) -> str:
    language = getattr(output, "language", None)
    if isinstance(language, list):
        language = language[0] if language else None
    return str(language or options.language or "")


def _sample_rate(model: Any) -> int:
    rate = getattr(model, "sample_rate", None) or getattr(getattr(model, "preprocessor_config", None), "sample_rate", 0)
    return int(rate or 16000)


def load_asr(spec: ModelSpec, path: Path, worker: Worker) -> Task[AsrEngine]:
    """Load with mlx-audio; Whisper runs in float32 on the CPU backend (float16 is slow there)."""
    from mlx_audio.stt import load

    model = load(str(path))
    yield
    if mx.default_device() == mx.cpu and is_whisper(model):
        float32_whisper(model)
    yield from materialize(model)
    return AsrEngine(model, spec, worker)
