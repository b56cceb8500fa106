"""Text to speech over mlx-audio (KittenTTS, Kokoro, and the other models `mlx_audio.tts.load` reads).

Each request drives its own `model.generate(...)` generator; one worker step is one `next()` of one of them,
taken round-robin, so two requests take turns chunk by chunk and other models keep their turns too. Each chunk
(float32 mono samples) goes to the request's queue as soon as it is made.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from mlxpool.config import ModelSpec
from mlxpool.engines.weights import materialize
from mlxpool.errors import GenerationError, InvalidRequestError
from mlxpool.worker import Task, Worker

Samples = npt.NDArray[np.float32]

WARM_UP_TEXT = "Hello."
"""Spoken once at load: KittenTTS creates its phonemizer on first use, which would slow the first request."""


@dataclass(frozen=True)
class SpeechChunk:
    samples: Samples
    """Float32 mono samples in [-1, 1] at the engine's `sample_rate`."""
    tokens: int = 0
    """Input tokens the model read for this chunk (phonemes, for KittenTTS and Kokoro), as mlx-audio counts them."""


@dataclass(frozen=True)
class _Failure:
    message: str


@dataclass(eq=False)
class SpeechRequest:
    text: str
    kwargs: dict[str, Any]
    queue: asyncio.Queue[SpeechChunk | _Failure | None]
    """Chunks, then None at the end, or a failure."""
    generator: Iterator[Any] | None = None
    cancelled: bool = False
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def send(self, item: SpeechChunk | _Failure | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class TtsEngine:
    def __init__(self, model: Any, spec: ModelSpec, path: Path, worker: Worker):
        self.model = model
        self.spec = spec
        self.worker = worker
        self.sample_rate = int(model.sample_rate)
        self.voices = list_voices(model, path)
        """The model's voices, sorted; empty: the model has no list, so any voice name is passed on to it."""
        self._parameters = inspect.signature(model.generate).parameters
        self.default_voice = self._default_voice()
        """What a request without a voice (or with one of OpenAI's) gets; None: the model's own default."""
        self._requests: deque[SpeechRequest] = deque()
        self.requests = 0
        self.chunks = 0

    # --- loop side -------------------------------------------------------------------------------------------

    def voice_or_raise(self, voice: str | None, openai_names: frozenset[str] = frozenset()) -> str | None:
        """The voice to use for `voice`: the default for None or OpenAI's names the model lacks; 400 if unknown."""
        if voice is None or (voice in openai_names and voice not in self.voices):
            return self.default_voice
        if self.voices and voice not in self.voices:
            raise InvalidRequestError(
                f"model {self.spec.name!r} has no voice {voice!r}; its voices: {', '.join(self.voices)}",
                param="voice",
            )
        return voice

    async def speak(
        self, text: str, voice: str | None, speed: float = 1.0, instructions: str | None = None, stream: bool = False
    ) -> AsyncGenerator[SpeechChunk, None]:
        """Speech for `text`, chunk by chunk. `voice` must come from `voice_or_raise`. Leaving early (client gone)
        drops the request at the engine's next step."""
        request = SpeechRequest(text, self._generate_kwargs(voice, speed, instructions, stream), asyncio.Queue())
        self.requests += 1
        self._requests.append(request)
        self.worker.wake()
        try:
            while (item := await request.queue.get()) is not None:
                if isinstance(item, _Failure):
                    raise GenerationError(f"speech generation failed: {item.message}")
                yield item
        finally:
            request.cancelled = True
            self.worker.wake()

    def describe(self) -> dict[str, Any]:
        return {
            "active_requests": len(self._requests),
            "requests": self.requests,
            "chunks": self.chunks,
            "sample_rate": self.sample_rate,
            "voices": len(self.voices),
        }

    # --- worker side -----------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._requests)

    def step(self) -> None:
        """One chunk of the request whose turn it is; cancelled requests met on the way are dropped."""
        while self._requests:
            request = self._requests[0]  # the loop only appends: the head stays put while it is worked on
            if request.cancelled:
                _close(self._requests.popleft())
                continue
            if self._advance(request):
                self._requests.rotate(-1)  # its next chunk waits for the others' turns
            else:
                self._requests.popleft()
            return

    def close(self) -> None:
        while self._requests:
            _close(self._requests.popleft())
        del self.model

    cache_bytes = 0  # nothing grows with use

    def trim_cache(self, max_bytes: int) -> None:
        pass

    def warm_up(self) -> None:
        """Speak a word and drop it (worker), so lazily created parts (KittenTTS's phonemizer) exist before use."""
        try:
            generator = iter(self.model.generate(WARM_UP_TEXT, **self._generate_kwargs(self.default_voice)))
            next(generator, None)
        except Exception as exc:
            raise RuntimeError(f"the warm-up generation failed: {exc}") from exc
        _close_generator(generator)

    def _advance(self, request: SpeechRequest) -> bool:
        """Send the request's next chunk; False when it has ended (done or failed)."""
        try:
            if request.generator is None:
                request.generator = iter(self.model.generate(request.text, **request.kwargs))
            result = next(request.generator)
            samples = to_samples(result.audio)
        except StopIteration:
            request.send(None)
            return False
        except Exception as exc:  # this request fails; the engine and the other requests go on
            request.send(_Failure(str(exc) or type(exc).__name__))
            _close(request)
            return False
        if samples.size:
            self.chunks += 1
            request.send(SpeechChunk(samples, int(getattr(result, "token_count", 0) or 0)))
        return True

    def _generate_kwargs(
        self, voice: str | None, speed: float = 1.0, instructions: str | None = None, stream: bool = False
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"speed": speed}
        if voice is not None:
            kwargs["voice"] = voice
        if instructions and "instruct" in self._parameters:
            kwargs["instruct"] = instructions
        if stream and "stream" in self._parameters:
            kwargs["stream"] = True  # models that decode tokens (Qwen3-TTS, ...) then yield audio as they go
        return kwargs

    def _default_voice(self) -> str | None:
        """The `voice` setting, else the default of the model's `generate`, else its first voice."""
        if self.spec.voice is not None:
            if self.voices and self.spec.voice not in self.voices:
                raise ValueError(f"the voice setting {self.spec.voice!r} is not one of {', '.join(self.voices)}")
            return self.spec.voice
        own = self._parameters["voice"].default if "voice" in self._parameters else None
        if not isinstance(own, str):
            return None  # generate() picks one itself (Kokoro: af_heart)
        return own if not self.voices or own in self.voices else self.voices[0]


def list_voices(model: Any, path: Path) -> list[str]:
    """The voice names a model knows: its `voices` table (KittenTTS, with its aliases), its preset speakers
    (Qwen3-TTS), or the `voices/*.safetensors` files of its directory (Kokoro)."""
    table = getattr(model, "voices", None)
    if isinstance(table, Mapping) and table:
        return sorted({*table, *(getattr(model, "voice_aliases", None) or {})})
    speakers = getattr(model, "get_supported_speakers", None)
    if callable(speakers):
        return sorted(str(s) for s in speakers() or [])
    return sorted(p.stem for p in (path / "voices").glob("*.safetensors"))


def to_samples(audio: Any) -> Samples:
    """A generated chunk as flat float32 numpy samples clipped to [-1, 1] (worker: it may evaluate MLX)."""
    if isinstance(audio, mx.array):
        audio = audio.astype(mx.float32)
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    return np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0)


def _close(request: SpeechRequest) -> None:
    if request.generator is not None:
        _close_generator(request.generator)
        request.generator = None


def _close_generator(generator: Iterator[Any]) -> None:
    close = getattr(generator, "close", None)
    if close is not None:
        close()


def load_tts(spec: ModelSpec, path: Path, worker: Worker) -> Task[TtsEngine]:
    """Load lazily with mlx-audio, materialize the weights a slice per step, then warm up with one word."""
    from mlx_audio.tts import load

    model = load(path, lazy=True)
    _share_phonemizer(model)
    yield
    yield from materialize(model)
    engine = TtsEngine(model, spec, path, worker)
    yield
    engine.warm_up()
    return engine


_PHONEMIZERS: dict[type, Any] = {}


def _share_phonemizer(model: Any) -> None:
    """KittenTTS builds an espeak phonemizer per model instance, and each loads its own copy of libespeak-ng that
    is never unloaded (~5 MB of RSS per load, found by bench/load.py's leak check): one per process instead. The
    worker is its only user."""
    if not (hasattr(model, "_phonemizer") and callable(getattr(model, "_get_phonemizer", None))):
        return
    kind = type(model)
    if kind not in _PHONEMIZERS:
        _PHONEMIZERS[kind] = model._get_phonemizer()
    model._phonemizer = _PHONEMIZERS[kind]
