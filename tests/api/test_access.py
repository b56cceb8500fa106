"""The request log: one `mlxpool.access` line per request, with the model and tokens the route recorded."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mlxpool.api.access import RequestObserver, log_request
from tests.conftest import ServeFactory, make_settings

LINE = re.compile(r"^(\S+) (\S+) model=(\S+) status=(\d+) ms=(\d+\.\d) tokens=(\S+)$")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, ...]]:
    """(method, path, model, status, tokens) of each request line, in order."""
    lines: list[tuple[str, ...]] = []
    for record in caplog.records:
        if record.name == "mlxpool.access":
            match = LINE.match(record.getMessage())
            assert match, record.getMessage()
            method, path, model, status, _, tokens = match.groups()
            lines.append((method, path, model, status, tokens))
    return lines


async def test_each_request_is_one_line_with_its_model_and_tokens(
    serve: ServeFactory, tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        {"qwen": {"kind": "embedding", "path": str(tiny_models["qwen3"]), "memory_reserve": "16MB"}},
        max_request_bytes="1KB",
    )
    caplog.set_level("INFO", logger="mlxpool.access")
    async with serve(settings) as s:
        embedded = await s.openai.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        await s.http.post("/v1/embeddings", json={"model": "nope", "input": "hi"})
        await s.http.post("/v1/embeddings", content=b"x" * 2000, headers={"content-type": "application/json"})
        await s.http.get("/health")
    assert access_lines(caplog) == [
        ("POST", "/v1/embeddings", "qwen", "200", str(embedded.usage.total_tokens)),
        ("POST", "/v1/embeddings", "-", "404", "-"),
        ("POST", "/v1/embeddings", "-", "413", "-"),
        ("GET", "/health", "-", "200", "-"),
    ]


async def streamed(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"one"
        request.state.tokens = 7  # known only once the stream has ended, as in chat
        yield b"two"

    request.state.model = "m"
    return StreamingResponse(body())


async def broken(request: Request) -> Response:
    request.state.model = "m"
    raise RuntimeError("boom")


async def test_a_stream_is_logged_when_it_ends_and_a_crash_as_500(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(
        routes=[Route("/s", streamed), Route("/b", broken)],
        middleware=[Middleware(RequestObserver, records=[log_request])],
    )
    caplog.set_level("INFO", logger="mlxpool.access")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/s")).text == "onetwo"
        assert (await http.get("/b")).status_code == 500
    assert access_lines(caplog) == [("GET", "/s", "m", "200", "7"), ("GET", "/b", "m", "500", "-")]
