"""/v1/audio/speech and /v1/audio/voices on a tiny random-weight KittenTTS: every format decodes at the model's
rate, streams arrive in pieces, SSE events carry the file, bad requests are 400s naming the field and the server
goes on. Random weights: the audio is a fixed noisy spectrum, not speech."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.types import ASGIApp, Message

from mlxpool.demo_audio import KITTEN_VOICE, build_tiny_kitten_tts
from mlxpool.engines.tts import TtsEngine
from tests.api.test_audio_io import decoded
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import slow_load

RATE = 24000
# KittenTTS speaks an input of up to 400 characters as one chunk and a longer one a sentence per chunk: the
# spaces make this one long without making it slow to speak.
TWO_SENTENCES = "Hello there." + " " * 400 + "How are you?"


@pytest.fixture(scope="session")
def tiny_kitten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_kitten_tts(tmp_path_factory.mktemp("kitten") / "tiny")


@pytest.fixture
async def served(serve: ServeFactory, tiny_kitten: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "tts": {"kind": "tts", "path": str(tiny_kitten), "memory_reserve": "16MB"},
            "emb": {"kind": "embedding", "path": str(tiny_kitten)},  # never loaded: only its kind matters
        }
    )
    async with serve(settings) as s:
        yield s


async def speech(s: Served, **fields: Any) -> Any:
    return await s.http.post("/v1/audio/speech", json={"model": "tts", "input": "Hello there.", **fields})


def engine(s: Served) -> TtsEngine:
    assert isinstance(s.pool.entries["tts"].engine, TtsEngine)
    return s.pool.entries["tts"].engine


@pytest.mark.parametrize("format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
async def test_every_format_decodes_at_the_models_rate(served: Served, format: str) -> None:
    response = await speech(served, response_format=format)
    assert response.status_code == 200, response.text
    expected = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac"}
    assert response.headers["content-type"] == expected.get(format, f"audio/{format}")
    if format == "pcm":  # raw 16-bit mono, no header
        assert len(response.content) % 2 == 0 and len(response.content) // 2 > RATE // 10
        return
    rate, seconds = decoded(response.content)
    assert rate == (48000 if format == "opus" else RATE) and seconds > 0.1


async def test_the_openai_client_gets_audio(served: Served) -> None:
    response = await served.openai.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello there.", response_format="wav"
    )
    rate, seconds = decoded(response.content)
    assert rate == RATE and seconds > 0.1


async def test_voices_are_listed(served: Served) -> None:
    expected = {"model": "tts", "voices": [KITTEN_VOICE], "default": KITTEN_VOICE}
    assert (await served.http.get("/v1/audio/voices", params={"model": "tts"})).json() == expected
    assert (await served.http.get("/v1/audio/voices")).json() == expected  # the default tts model
    wrong = await served.http.get("/v1/audio/voices", params={"model": "emb"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"


@pytest.mark.parametrize("voice", [KITTEN_VOICE, {"id": KITTEN_VOICE}, "alloy", "verse", None])
async def test_the_models_voices_and_openais_names_speak(served: Served, voice: Any) -> None:
    response = await speech(served, voice=voice, response_format="wav")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": " \n\t "}, "input"),
        ({"input": "a" * 4097}, "input"),
        ({"voice": "nobody"}, "voice"),
        ({"response_format": "ogg"}, "response_format"),
        ({"speed": 0.2}, "speed"),
        ({"speed": 4.5}, "speed"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"model": "emb"}, "model"),
    ],
)
async def test_bad_requests_are_400s_and_the_server_goes_on(served: Served, fields: dict[str, Any], param: str) -> None:
    response = await speech(served, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if param == "voice":
        assert KITTEN_VOICE in response.json()["error"]["message"]  # the voices the model has
    assert (await speech(served)).status_code == 200


async def test_an_unknown_voice_is_a_400_for_a_stream_of_a_loaded_model(served: Served) -> None:
    await speech(served)
    response = await speech(served, voice="nobody", stream_format="audio")
    assert response.status_code == 400 and response.json()["error"]["param"] == "voice"


async def test_a_failing_model_is_a_500_and_the_engine_goes_on(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    await speech(served)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("vocoder exploded")

    monkeypatch.setattr(engine(served).model, "generate", broken)
    response = await speech(served)
    assert response.status_code == 500 and response.json()["error"]["code"] == "generation_failed"
    assert "vocoder exploded" in response.json()["error"]["message"]
    monkeypatch.undo()
    assert (await speech(served)).status_code == 200


async def test_the_engine_speaks_a_long_input_a_chunk_at_a_time(served: Served) -> None:
    await speech(served)
    chunks = [c async for c in engine(served).speak(TWO_SENTENCES, KITTEN_VOICE)]
    assert len(chunks) == 2 and all(c.samples.dtype == np.float32 and c.samples.size for c in chunks)
    assert all(np.abs(c.samples).max() <= 1.0 and c.tokens > 0 for c in chunks)


async def test_streamed_audio_is_sent_as_it_is_made(served: Served) -> None:
    body = {"model": "tts", "input": TWO_SENTENCES, "response_format": "wav", "stream_format": "audio"}
    pieces = await post_streaming(served.app, "/v1/audio/speech", body)
    assert len(pieces) == 2  # one per chunk (the first with the header)
    rate, seconds = decoded(b"".join(pieces))
    whole = await speech(served, input=TWO_SENTENCES, response_format="wav")
    assert rate == RATE and seconds == decoded(whole.content)[1]
    streamed = await served.http.post("/v1/audio/speech", json={**body, "response_format": "mp3"})
    assert streamed.status_code == 200 and decoded(streamed.content)[1] > 0.1


async def test_sse_events_carry_the_file_and_usage(served: Served) -> None:
    response = await speech(served, input=TWO_SENTENCES, response_format="wav", stream_format="sse")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) == 2 and {e["type"] for e in deltas} == {"speech.audio.delta"}
    rate, seconds = decoded(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    assert rate == RATE and seconds > 0.1
    usage = done["usage"]
    assert done["type"] == "speech.audio.done" and usage["input_tokens"] > 0 and usage["output_tokens"] == 0
    assert usage["total_tokens"] == usage["input_tokens"]


async def test_a_client_that_leaves_frees_the_engine(served: Served) -> None:
    await speech(served)
    tts = engine(served)
    text = " ".join(["Hello there."] * 40) + " " * 400  # 40 chunks
    before = tts.chunks
    stream = tts.speak(text, KITTEN_VOICE)
    await anext(stream)
    assert tts.describe()["active_requests"] == 1
    await stream.aclose()  # what a disconnect does to the route's generator
    for _ in range(100):
        if tts.describe()["active_requests"] == 0:
            break
        await asyncio.sleep(0.01)
    assert tts.describe()["active_requests"] == 0 and tts.chunks - before < 10


async def test_a_client_that_leaves_a_stream_ends_its_request(served: Served) -> None:
    await speech(served)
    body = {"model": "tts", "input": " ".join(["Hello there."] * 40) + " " * 400, "stream_format": "audio"}
    before = engine(served).chunks
    pieces = await post_streaming(served.app, "/v1/audio/speech", body, leave_after=2)
    assert len(pieces) >= 2
    for _ in range(100):
        if engine(served).describe()["active_requests"] == 0 and served.pool.entries["tts"].leases == 0:
            break
        await asyncio.sleep(0.01)
    assert engine(served).describe()["active_requests"] == 0 and served.pool.entries["tts"].leases == 0
    assert engine(served).chunks - before < 10


async def test_concurrent_requests_both_complete(served: Served) -> None:
    one, two = await asyncio.gather(
        speech(served, input=TWO_SENTENCES, response_format="flac"), speech(served, response_format="wav")
    )
    assert one.status_code == two.status_code == 200
    assert decoded(one.content)[1] > decoded(two.content)[1] > 0.1


async def test_a_voice_setting_the_model_lacks_fails_the_load(serve: ServeFactory, tiny_kitten: Path) -> None:
    settings = make_settings({"tts": {"kind": "tts", "path": str(tiny_kitten), "voice": "nobody"}})
    async with serve(settings) as s:
        response = await speech(s)
    assert response.status_code == 503 and "nobody" in response.json()["error"]["message"]


async def test_an_sse_stream_waiting_for_a_cold_model_gets_comments_then_errors_as_events(
    serve: ServeFactory, tiny_kitten: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxpool.api import speech as speech_api

    monkeypatch.setattr(speech_api, "COMMENT_INTERVAL", 0.02)
    settings = make_settings({"tts": {"kind": "tts", "path": str(tiny_kitten)}})
    async with serve(settings, loader=slow_load) as s:
        response = await speech(s, voice="nobody", stream_format="sse")  # known bad only once loaded
    lines = [line for line in response.text.splitlines() if line]
    assert response.status_code == 200 and lines[0] == ": loading tts"
    event = json.loads(lines[-1][6:])
    assert event["type"] == "error" and event["error"]["param"] == "voice"


async def post_streaming(app: ASGIApp, path: str, body: dict[str, Any], leave_after: int = 0) -> list[bytes]:
    """The response body's pieces as the app sends them, calling it directly (httpx's ASGITransport joins them
    into one). With `leave_after`, the client disconnects once that many pieces have arrived."""
    payload = json.dumps(body).encode()
    pieces: list[bytes] = []
    gone = asyncio.Event()
    requests = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            pieces.append(message["body"])
            if len(pieces) == leave_after:
                gone.set()

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "server": ("mlxpool", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
    await app(scope, receive, send)
    return pieces
