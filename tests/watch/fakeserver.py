"""A stand-in for the server's transcription, chat and model routes, as an httpx MockTransport handler."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from mlxpool.watch.client import ServerClient

TEXT = "hello there. this is a test of the daemon! does it work? it does."


class FakeServer:
    """Transcribes every file as TEXT (a file named `bad*` is invalid audio); corrects by upper-casing, with a
    `<think>` block in front that the client must drop. `fail` can answer a request first."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.fail: Callable[[httpx.Request], httpx.Response | None] = lambda request: None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        failure = self.fail(request)
        if failure is not None:
            return failure
        path = request.url.path
        if path == "/v1/audio/transcriptions":
            return self.transcription(request)
        if path.startswith("/v1/models/"):
            name = path.rsplit("/", 1)[1]
            return httpx.Response(200, json={"id": {"whisper-1": "fake-asr", "gpt-4o": "fake-llm"}.get(name, name)})
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            piece = body["messages"][-1]["content"]
            message = {"role": "assistant", "content": f"<think>hm</think>{piece.upper()}", "reasoning_content": "x"}
            return httpx.Response(200, json={"model": "fake-llm", "choices": [{"message": message}]})
        return httpx.Response(404, json=error("no route", "not_found"))

    def transcription(self, request: httpx.Request) -> httpx.Response:
        if b'filename="bad' in request.content:
            return httpx.Response(400, json=error("file: not a readable audio file", "invalid_audio"))
        segments = [{"start": 0.0, "end": 0.5, "text": " hello there."}, {"start": 0.5, "end": 1.0, "text": " rest"}]
        return httpx.Response(
            200, json={"text": " " + TEXT, "duration": 1.0, "language": "english", "segments": segments}
        )

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def client(self, **kwargs: Any) -> ServerClient:
        return ServerClient("http://mlxpool", transport=httpx.MockTransport(self), sleep=lambda s: None, **kwargs)


def error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
