"""/v1/audio/transcriptions and /translations on a tiny random-weight Whisper: every container decodes, every
response_format parses with an independent parser, long audio goes a window per step, streaming sends OpenAI's
events, bad audio is a 400 and the server goes on. Random weights: gibberish text with arbitrary times."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import srt  # type: ignore[import-untyped]
import webvtt

from mlxpool.demo_audio import build_tiny_whisper
from mlxpool.engines.asr import AsrEngine
from tests.api.test_audio_io import INPUTS, tone, write
from tests.conftest import Served, ServeFactory, make_settings


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


@pytest.fixture
async def served(serve: ServeFactory, tiny_whisper: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "asr": {"kind": "asr", "path": str(tiny_whisper), "memory_reserve": "16MB"},
            "emb": {"kind": "embedding", "path": str(tiny_whisper), "memory_reserve": "16MB"},
        },
        max_request_bytes="3MB",
    )
    async with serve(settings) as s:
        yield s


def wav(seconds: float = 2.0, rate: int = 16000) -> bytes:
    return write("wav", "pcm_s16le", tone(rate, 1, seconds), rate)


def clock(text: str) -> float:
    """Seconds from a WebVTT `HH:MM:SS.mmm` time (webvtt-py's own `*_in_seconds` are whole seconds)."""
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


async def transcribe(s: Served, data: bytes, route: str = "transcriptions", **fields: Any) -> Any:
    form = {"model": "asr", "temperature": "0"}
    form |= {f"{k}[]" if isinstance(v, list) else k: v for k, v in fields.items()}
    return await s.http.post(f"/v1/audio/{route}", data=form, files={"file": ("audio.bin", data)}, timeout=120)


@pytest.mark.parametrize("name", sorted(INPUTS))
async def test_every_container_transcribes(served: Served, name: str) -> None:
    muxer, codec = INPUTS[name]
    response = await transcribe(served, write(muxer, codec, tone(44100, 2, 1.5), 44100), response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "transcribe" and body["language"] == "english"
    assert abs(body["duration"] - 1.5) < 0.1


async def test_every_response_format_parses(served: Served) -> None:
    data = wav(3)
    as_json = (await transcribe(served, data)).json()
    text = (await transcribe(served, data, response_format="text")).text
    assert set(as_json) == {"text"} and text == as_json["text"]
    verbose = (await transcribe(served, data, response_format="verbose_json")).json()
    assert verbose["text"] == as_json["text"]
    segments = verbose["segments"]
    assert all(0 <= s["start"] <= s["end"] <= verbose["duration"] for s in segments)
    assert all({"avg_logprob", "no_speech_prob", "tokens", "seek"} <= set(s) for s in segments)
    subtitles = list(srt.parse((await transcribe(served, data, response_format="srt")).text))
    captions = webvtt.from_string((await transcribe(served, data, response_format="vtt")).text).captions
    spoken = [s for s in segments if s["text"].strip()]
    assert len(subtitles) == len(captions) == len(spoken)
    for sub, cap, seg in zip(subtitles, captions, spoken, strict=True):
        assert (
            abs(sub.start.total_seconds() - seg["start"]) < 0.002 and abs(sub.end.total_seconds() - seg["end"]) < 0.002
        )
        assert abs(clock(cap.start) - seg["start"]) < 0.002 and abs(clock(cap.end) - seg["end"]) < 0.002


async def test_word_timestamps(served: Served) -> None:
    response = await transcribe(
        served, wav(3), response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    body = response.json()
    assert "words" in body and all(w["start"] <= w["end"] for w in body["words"])
    assert all(body["words"][i]["start"] <= body["words"][i + 1]["start"] for i in range(len(body["words"]) - 1))


async def test_long_audio_goes_a_window_per_step_and_others_keep_their_turns(served: Served) -> None:
    await served.pool.load("asr")
    engine = served.pool.entries["asr"].engine
    assert isinstance(engine, AsrEngine)
    before = engine.windows
    long = transcribe(served, wav(75), response_format="verbose_json")
    short = transcribe(served, wav(1))
    long_response, short_response = await asyncio.gather(long, short)
    assert long_response.status_code == short_response.status_code == 200
    assert engine.windows - before >= 3 + 1  # 75 s: at least three windows, one for the short one
    body = long_response.json()
    assert abs(body["duration"] - 75) < 0.1 and short_response.status_code == 200
    assert all(s["end"] <= 75 for s in body["segments"])


async def test_streaming_sends_deltas_then_done(served: Served) -> None:
    whole = (await transcribe(served, wav(40))).json()["text"]
    response = await transcribe(served, wav(40), stream="true")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "transcript.text.delta"]
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["text"] == whole
    assert "".join(deltas).strip() == whole and len(deltas) >= 1


async def test_translation_and_the_openai_client(served: Served, tmp_path: Path) -> None:
    # English-only Whisper (like the tiny one, or whisper-*.en) cannot translate: a clear 400
    translated = await transcribe(served, wav(2), route="translations", response_format="verbose_json")
    assert translated.status_code == 400 and "cannot translate" in translated.json()["error"]["message"]
    path = tmp_path / "speech.wav"
    path.write_bytes(wav(2))
    with path.open("rb") as file:
        result = await served.openai.audio.transcriptions.create(model="whisper-1", file=file, language="en")
    assert isinstance(result.text, str)


@pytest.mark.parametrize(
    ("data", "fields", "status", "param", "says"),
    [
        (b"", {}, 400, "file", "empty"),
        (np.random.default_rng(0).bytes(4000), {}, 400, "file", "not a readable audio file"),
        (wav(2)[:60], {}, 400, "file", "not a readable audio file"),  # cut inside its header
        (write("wav", "pcm_s16le", np.zeros((1, 16000), np.float32), 16000), {}, 400, "file", "silent"),
        (b"hello, I am a text file\n" * 10, {}, 400, "file", "not a readable audio file"),
        (wav(), {"response_format": "xml"}, 400, "response_format", "response_format"),
        (wav(), {"model": "emb"}, 400, "model", "asr model"),
        (wav(), {"model": "nope"}, 404, "model", "nope"),
        (wav(), {"stream": "true", "response_format": "srt"}, 400, "stream", "stream"),
        (wav(), {"timestamp_granularities": ["word"]}, 400, "timestamp_granularities", "verbose_json"),
        (wav(), {"temperature": "3"}, 400, "temperature", "temperature"),
        (wav(100), {}, 413, None, "larger than the limit"),
    ],
)
async def test_bad_input_is_a_clear_error_and_the_server_goes_on(
    served: Served, data: bytes, fields: dict[str, Any], status: int, param: str | None, says: str
) -> None:
    response = await transcribe(served, data, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]
    assert (await transcribe(served, wav(1))).status_code == 200


async def test_a_client_that_leaves_stops_its_transcription(served: Served) -> None:
    from mlxpool.api.audio_io import decode_audio_or_raise
    from mlxpool.engines.asr import TranscribeOptions

    await served.pool.load("asr")
    engine = served.pool.entries["asr"].engine
    assert isinstance(engine, AsrEngine)
    audio = decode_audio_or_raise(wav(150), 16000)
    before = engine.windows
    windows = engine.transcribe(audio, TranscribeOptions(temperature=0.0))
    await anext(windows)
    await windows.aclose()  # what a disconnect does to the route's task
    while engine.has_work():
        await asyncio.sleep(0.01)
    assert engine.windows - before < 4  # 150 s would take at least 5
