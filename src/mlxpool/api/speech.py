"""POST /v1/audio/speech (whole files, streamed audio, or SSE events) and GET /v1/audio/voices."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.api.audio_io import MEDIA_TYPES, AudioEncoder, Samples, encode_audio
from mlxpool.api.disconnect import run_until_disconnect
from mlxpool.api.errors import error_body, parse_body_or_raise
from mlxpool.api.responses import Stream
from mlxpool.engines import Engine
from mlxpool.engines.tts import TtsEngine
from mlxpool.errors import MlxpoolError, ModelNotFoundError, UnsupportedKindError
from mlxpool.pool import ModelEntry, ModelPool

log = logging.getLogger(__name__)

OPENAI_VOICES = frozenset(
    ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar")
)
"""OpenAI's voice names: a model that has no voice of that name speaks them in its default voice."""
DEFAULT_MODEL = "tts-1"
"""OpenAI's name, which resolves to the default tts model: GET /v1/audio/voices without `model` lists its voices."""
COMMENT_INTERVAL = 2.0
"""Seconds between `: loading MODEL` comment lines sent to an SSE stream waiting for its model."""


class VoiceId(BaseModel):
    id: str


class CreateSpeechRequest(BaseModel):
    """OpenAI API reference: Audio → Create speech (POST /v1/audio/speech)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: str | VoiceId | None = None
    """A voice name or `{"id": name}`; None: the model's default voice."""
    instructions: str | None = None
    """Passed to models whose `generate` takes `instruct`; ignored by the others."""
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    """Given: the response streams (encoded audio as it is made, or SSE events). Absent: one whole file."""

    @field_validator("input")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the input is blank")
        return value

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    @property
    def streams(self) -> bool:
        return "stream_format" in self.model_fields_set


async def create_speech(request: Request) -> Response:
    body = await parse_body_or_raise(request, CreateSpeechRequest)
    pool: ModelPool = request.app.state.pool
    entry = tts_entry_or_raise(pool, body.model)
    request.state.model = entry.spec.name  # for the request log and the metrics
    if isinstance(entry.engine, TtsEngine):  # loaded: a bad voice is a 400 even for streams
        entry.engine.voice_or_raise(body.voice_name, OPENAI_VOICES)
    if body.streams and body.stream_format == "sse":
        return Stream(_sse_events(pool, body), media_type="text/event-stream", headers=_NO_CACHE)
    media_type = MEDIA_TYPES[body.response_format]
    if body.streams:
        return Stream(_audio_stream(pool, body), media_type=media_type, headers=_NO_CACHE)
    samples, sample_rate = await run_until_disconnect(request, _collect(pool, body))
    data = await asyncio.to_thread(encode_audio, samples, sample_rate, body.response_format)
    return Response(data, media_type=media_type)


async def list_voices(request: Request) -> Response:
    """mlxpool's own: `{"model", "voices", "default"}` of `?model=NAME` (default: the default tts model)."""
    pool: ModelPool = request.app.state.pool
    try:
        entry = tts_entry_or_raise(pool, request.query_params.get("model") or DEFAULT_MODEL)
    except ModelNotFoundError:
        if "model" in request.query_params:
            raise
        raise ModelNotFoundError("no text-to-speech model is configured", param="model") from None
    engine = await run_until_disconnect(request, _loaded(pool, entry.spec.name))
    return JSONResponse({"model": entry.spec.name, "voices": engine.voices, "default": engine.default_voice})


def tts_entry_or_raise(pool: ModelPool, name: str) -> ModelEntry:
    entry = pool.resolve(name, "tts")
    if entry.spec.kind != "tts":
        raise UnsupportedKindError(
            f"model {entry.spec.name!r} is a {entry.spec.kind} model; this route needs a tts model", param="model"
        )
    return entry


_NO_CACHE = {"Cache-Control": "no-cache"}


async def _loaded(pool: ModelPool, name: str) -> TtsEngine:
    async with pool.acquire(name) as engine:
        return _tts(engine)


async def _collect(pool: ModelPool, body: CreateSpeechRequest) -> tuple[Samples, int]:
    async with pool.acquire(body.model) as engine:
        tts = _tts(engine)
        voice = tts.voice_or_raise(body.voice_name, OPENAI_VOICES)
        chunks = [c.samples async for c in tts.speak(body.input, voice, body.speed, body.instructions)]
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), tts.sample_rate


async def _encoded(engine: TtsEngine, body: CreateSpeechRequest) -> AsyncIterator[tuple[bytes, int]]:
    """Pieces of one file in `response_format` as the chunks come, each with the input tokens its chunk read.

    Encoding a chunk takes milliseconds: it runs on the loop, so leaving early never races an encoder thread.
    """
    voice = engine.voice_or_raise(body.voice_name, OPENAI_VOICES)
    encoder = AudioEncoder(body.response_format, engine.sample_rate)
    try:
        async for chunk in engine.speak(body.input, voice, body.speed, body.instructions, stream=True):
            yield encoder.encode(chunk.samples), chunk.tokens
    finally:
        tail = encoder.finish()  # also closes the container of a stream left early
    yield tail, 0


async def _audio_stream(pool: ModelPool, body: CreateSpeechRequest) -> AsyncIterator[bytes]:
    try:
        async with pool.acquire(body.model) as engine:
            async for data, _ in _encoded(_tts(engine), body):
                if data:
                    yield data
    except MlxpoolError as exc:  # the 200 is already sent and audio has no error frame: end the file here
        log.warning("speech stream from %s ended early: %s", body.model, exc.message)


async def _sse_events(pool: ModelPool, body: CreateSpeechRequest) -> AsyncIterator[bytes]:
    """OpenAI's speech events: `speech.audio.delta` (base64 of the next bytes of the file), then
    `speech.audio.done` with usage; an error after the 200 arrives as an `error` event instead."""
    tokens = 0
    try:
        async for line in pool.wait_ready(body.model, COMMENT_INTERVAL):
            yield f": {line}\n\n".encode()
        async with pool.acquire(body.model) as engine:
            async for data, read in _encoded(_tts(engine), body):
                tokens += read
                if data:
                    yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
        usage = {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens}
        yield _sse({"type": "speech.audio.done", "usage": usage})
    except MlxpoolError as exc:
        yield _sse({"type": "error", **error_body(exc.message, exc.type, exc.param, exc.code)})


def _tts(engine: Engine) -> TtsEngine:
    assert isinstance(engine, TtsEngine)
    return engine


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"
