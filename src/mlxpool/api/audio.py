"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart), streamed (SSE) or not.

OpenAI API reference: Audio → Create transcription / Create translation. The upload is decoded with PyAV in a
thread (any container FFmpeg reads, down-mixed and resampled to the model's rate); the engine decodes it a
window per worker step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.api.audio_io import decode_audio_or_raise
from mlxpool.api.disconnect import run_until_disconnect
from mlxpool.api.errors import error_body
from mlxpool.api.responses import Stream
from mlxpool.api.transcripts import ResponseFormat, Task, render_transcript
from mlxpool.engines.asr import AsrEngine, TranscribeOptions
from mlxpool.engines.transcript import Segment, Transcript, Word
from mlxpool.engines.whisper import Window
from mlxpool.errors import InvalidAudioError, InvalidRequestError, MlxpoolError, UnsupportedKindError
from mlxpool.pool import ModelPool

SILENCE = 1e-4
"""Peak amplitude below which audio counts as silent (-80 dBFS): refused rather than transcribed into noise."""


class TranscriptionForm(BaseModel):
    """The form fields of OpenAI's transcription and translation requests (besides `file`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    language: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z]+)?$")
    prompt: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Literal["word", "segment"]] = Field(default_factory=list)
    stream: bool = False


async def create_transcription(request: Request) -> Response:
    return await _handle(request, "transcribe")


async def create_translation(request: Request) -> Response:
    return await _handle(request, "translate")


async def _handle(request: Request, task: Task) -> Response:
    form, data = await _form_or_raise(request)
    pool: ModelPool = request.app.state.pool
    spec = pool.resolve(form.model, "asr").spec
    request.state.model = spec.name  # for the request log and the metrics
    if spec.kind != "asr":
        raise UnsupportedKindError(
            f"model {spec.name!r} is a {spec.kind} model; this route needs an asr model", param="model"
        )
    if form.stream and form.response_format not in ("json", "text"):
        raise InvalidRequestError("stream needs response_format json or text", param="stream")
    words = "word" in form.timestamp_granularities
    if words and form.response_format != "verbose_json":
        raise InvalidRequestError(
            "timestamp_granularities needs response_format verbose_json", param="timestamp_granularities"
        )
    options = TranscribeOptions(form.language, task, form.prompt, form.temperature, words)
    if form.stream:
        return Stream(_stream(pool, spec.name, data, options), media_type="text/event-stream")
    transcript = await run_until_disconnect(request, _transcribe(pool, spec.name, data, options))
    body, media_type = render_transcript(transcript, form.response_format, task)
    return (
        JSONResponse(body, media_type=media_type) if isinstance(body, dict) else Response(body, media_type=media_type)
    )


async def _form_or_raise(request: Request) -> tuple[TranscriptionForm, bytes]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send the audio as multipart/form-data with a `file` part", param="file")
    async with request.form(max_files=1, max_fields=32) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("the multipart body has no `file` part", param="file")
        data = await upload.read()
        fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and not k.endswith("[]")}
        granularities = [v for v in form.getlist("timestamp_granularities[]") if isinstance(v, str)]
    try:
        return TranscriptionForm.model_validate({**fields, "timestamp_granularities": granularities}), data
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise InvalidRequestError(f"Invalid value for '{param}': {first['msg']}", param=param) from None


async def _audio_or_raise(engine: AsrEngine, data: bytes) -> np.ndarray:
    return await asyncio.to_thread(_decoded_or_raise, data, engine.sample_rate)


def _decoded_or_raise(data: bytes, sample_rate: int) -> np.ndarray:
    """Decoded audio (in a thread: an hour of it is 57 M samples to scan), or a 400 when it is silent."""
    audio = decode_audio_or_raise(data, sample_rate)
    if float(np.max(np.abs(audio))) < SILENCE:
        raise InvalidAudioError("file: the audio is silent; there is nothing to transcribe", param="file")
    return audio


async def _windows(
    pool: ModelPool, model: str, data: bytes, options: TranscribeOptions
) -> AsyncIterator[Window | float]:
    """The audio's duration, then its windows."""
    async with pool.acquire(model) as engine:
        assert isinstance(engine, AsrEngine)
        if options.task == "translate" and not engine.translates:
            raise InvalidRequestError(f"model {model!r} cannot translate; use /v1/audio/transcriptions", param="model")
        audio = await _audio_or_raise(engine, data)
        yield len(audio) / engine.sample_rate
        async for window in engine.transcribe(audio, options):
            yield window


async def _transcribe(pool: ModelPool, model: str, data: bytes, options: TranscribeOptions) -> Transcript:
    duration, segments, words, language = 0.0, list[Segment](), list[Word](), options.language or ""
    async for item in _windows(pool, model, data, options):
        if isinstance(item, float):
            duration = item
            continue
        segments += item.segments
        words += item.words
        language = item.language or language
    segments = _kept(segments, duration)
    text = "".join(s.text for s in segments).strip()
    return Transcript(text, _language_name(language), duration, segments, words if options.words else None)


async def _stream(pool: ModelPool, model: str, data: bytes, options: TranscribeOptions) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: `transcript.text.delta` events, then `transcript.text.done`."""
    pieces: list[str] = []
    duration = 0.0
    try:
        async for item in _windows(pool, model, data, options):
            if isinstance(item, float):
                duration = item
            else:
                delta = "".join(s.text for s in _kept(item.segments, duration))
                if delta:
                    text = delta.lstrip() if not pieces else delta
                    pieces.append(text)
                    yield _sse({"type": "transcript.text.delta", "delta": text})
        yield _sse({"type": "transcript.text.done", "text": "".join(pieces).strip()})
    except MlxpoolError as exc:  # the 200 is already sent: report the error in the stream, as OpenAI does
        yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _kept(segments: list[Segment], duration: float) -> list[Segment]:
    """The segments inside the audio, with times clamped to it; empty spans (past its end) dropped."""
    return [c for s in segments if (c := _clamped(s, duration)).end - c.start >= 0.001]


def _clamped(segment: Segment, duration: float) -> Segment:
    """Whisper's timestamps can run past the end of the audio: keep them inside it."""
    end = min(segment.end, duration)
    start = min(segment.start, end)
    if (start, end) == (segment.start, segment.end):
        return segment
    return replace(segment, start=start, end=end)


def _language_name(code: str) -> str:
    """OpenAI writes the language's English name (`english`); Whisper's codes map to it."""
    from mlx_audio.stt.models.whisper.tokenizer import LANGUAGES

    return str(LANGUAGES.get(code, code))
