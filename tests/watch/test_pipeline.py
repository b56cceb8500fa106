from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mlxpool.watch import pipeline
from mlxpool.watch.client import ServerError
from mlxpool.watch.pipeline import Options, strip_reasoning
from tests.watch.fakeserver import TEXT, FakeServer, error


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        ("plain answer", "plain answer"),
        ("<think>\nlet me see\n</think>\n\nThe answer.", "The answer."),
        ("A <think>aside</think>B <think>more</think>C", "A B C"),
        ("<think>never closed, all of it reasoning", ""),
        ("the template opened it\n</think>\nThe answer.", "The answer."),
        ("", ""),
    ],
)
def test_strip_reasoning(content: str, kept: str) -> None:
    assert strip_reasoning(content) == kept


def test_transcribe_asks_for_verbose_json_and_names_the_model_the_server_used(tmp_path: Path) -> None:
    audio = tmp_path / "memo.m4a"
    audio.write_bytes(b"audio bytes")
    server = FakeServer()
    heard = pipeline.transcribe(server.client(), audio, Options(language="en"))
    assert (heard.text, heard.duration, heard.language, heard.model) == (TEXT, 1.0, "english", "fake-asr")
    assert [(s.start, s.end, s.text) for s in heard.segments] == [(0.0, 0.5, " hello there."), (0.5, 1.0, " rest")]
    upload = server.requests[0].content
    for field in (b'name="model"\r\n\r\nwhisper-1', b'name="response_format"\r\n\r\nverbose_json', b"audio bytes"):
        assert field in upload
    assert b'name="language"\r\n\r\nen' in upload and b'filename="memo.m4a"' in upload


def test_a_model_the_server_cannot_look_up_keeps_its_requested_name() -> None:
    server = FakeServer()
    server.fail = lambda r: httpx.Response(404, json=error("no", "model_not_found")) if "models" in r.url.path else None
    assert pipeline.model_id(server.client(), "org/some-model") == "org/some-model"
    assert server.requests[0].url.raw_path == b"/v1/models/org%2Fsome-model"


def test_correct_piece_asks_for_a_deterministic_correction_without_reasoning() -> None:
    server = FakeServer()
    options = Options(llm_model="gpt-4o", prompt="Fix it.")
    text, model = pipeline.correct_piece(server.client(), "hello there.", options)
    assert (text, model) == ("HELLO THERE.", "fake-llm")
    body = json.loads(server.requests[0].content)
    assert body["messages"] == [{"role": "system", "content": "Fix it."}, {"role": "user", "content": "hello there."}]
    assert body["temperature"] == 0 and body["max_tokens"] == len("hello there.") // 2 + 64
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_an_empty_correction_keeps_the_piece() -> None:
    server = FakeServer()
    message = {"role": "assistant", "content": "<think>only thoughts</think>  "}
    server.fail = lambda r: httpx.Response(200, json={"model": "m", "choices": [{"message": message}]})
    assert pipeline.correct_piece(server.client(), "keep me", Options(max_tokens=3))[0] == "keep me"
    assert json.loads(server.requests[0].content)["max_tokens"] == 3


def test_correct_sends_each_piece_and_joins_the_answers() -> None:
    server = FakeServer()
    text, model = pipeline.correct(server.client(), TEXT, Options(chunk_chars=30))
    assert text == TEXT.upper() and model == "fake-llm"
    assert server.paths() == ["/v1/chat/completions"] * 3
    assert pipeline.correct(server.client(), "", Options()) == ("", "gpt-4o")


def test_invalid_audio_is_a_server_error(tmp_path: Path) -> None:
    audio = tmp_path / "bad.wav"
    audio.write_bytes(b"junk")
    with pytest.raises(ServerError, match="400 invalid_audio: file: not a readable audio file") as caught:
        pipeline.transcribe(FakeServer().client(), audio, Options())
    assert caught.value.status == 400
