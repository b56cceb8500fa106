"""API keys on every route but the liveness check (and the status page's HTML); CORS; the CLI sends the key."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from starlette.routing import Route

from mlxpool.api.app import routes
from mlxpool.cli import auth_headers, parser
from mlxpool.config import load_settings
from mlxpool.errors import ConfigError
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakes import FakeLoader

KEYS = ["first-key", "second-key"]
OPEN = {("GET", "/health"), ("GET", "/")}


def every_route() -> list[tuple[str, str]]:
    """(method, concrete path) for each route of the app, path parameters filled in."""
    table = []
    for route in routes():
        assert isinstance(route, Route) and route.methods
        path = re.sub(r"{[^}]+}", "m", route.path)
        table += [(method, path) for method in sorted(route.methods - {"HEAD"})]
    return table


@pytest.fixture
async def locked(serve: ServeFactory, tmp_path: Path) -> AsyncIterator[Served]:
    settings = make_settings(
        {"m": {"kind": "embedding", "path": str(tmp_path)}}, api_keys=KEYS, cors_origins=["https://app.example"]
    )
    async with serve(settings, loader=FakeLoader({})) as s:
        yield s


@pytest.mark.parametrize(("method", "path"), every_route())
async def test_every_route_needs_a_key_but_liveness(locked: Served, method: str, path: str) -> None:
    without = await locked.http.request(method, path)
    keyed = await locked.http.request(method, path, headers={"Authorization": f"Bearer {KEYS[1]}"})
    if (method, path) in OPEN:
        assert without.status_code == 200
    else:
        assert without.status_code == 401, without.text
        assert without.headers["www-authenticate"] == "Bearer"
        assert without.json() == {
            "error": {
                "message": without.json()["error"]["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    assert keyed.status_code != 401


@pytest.mark.parametrize(("method", "path"), every_route())
async def test_without_keys_no_route_asks_for_one(serve: ServeFactory, tmp_path: Path, method: str, path: str) -> None:
    async with serve(make_settings({"m": {"kind": "embedding", "path": str(tmp_path)}}), loader=FakeLoader({})) as s:
        assert (await s.http.request(method, path)).status_code != 401


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong-key", "Bearer first-key2", "Bearer first-ke", "Basic Zmlyc3Qta2V5", "first-key", "Bearer", ""],
)
async def test_wrong_keys_and_schemes_are_refused(locked: Served, header: str) -> None:
    response = await locked.http.get("/v1/models", headers={"Authorization": header})
    assert response.status_code == 401


async def test_the_openai_client_sends_its_key(locked: Served) -> None:
    locked.openai.api_key = KEYS[0]
    assert [m.id for m in (await locked.openai.models.list()).data] == ["m"]
    locked.openai.api_key = "wrong"
    with pytest.raises(openai.AuthenticationError) as refused:
        await locked.openai.models.list()
    assert refused.value.code == "invalid_api_key"


async def test_cors_preflight_needs_no_key_and_refusals_carry_cors_headers(locked: Served) -> None:
    preflight = await locked.http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = await locked.http.get("/v1/models", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    other = await locked.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_without_cors_origins_there_are_no_cors_headers(serve: ServeFactory, tmp_path: Path) -> None:
    async with serve(make_settings({}), loader=FakeLoader({})) as s:
        response = await s.http.get("/v1/models", headers={"Origin": "https://app.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


async def test_refusals_are_counted_by_route(locked: Served) -> None:
    await locked.http.post("/v1/embeddings", json={"model": "m", "input": "hi"})
    scrape = await locked.http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
    line = 'mlxpool_requests_total{method="POST",model="",route="/v1/embeddings",status="401"} 1.0'
    assert line in scrape.text


def test_keys_come_from_the_environment_and_must_be_tokens(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text("")
    settings = load_settings(config, env={"MLXPOOL_API_KEYS": "a-key, another", "MLXPOOL_CORS_ORIGINS": "*"})
    assert settings.server.api_keys == ["a-key", "another"] and settings.server.cors_origins == ["*"]
    assert "a-key" not in repr(settings.server)
    config.write_text('[server]\napi_keys = ["two words"]\n')
    with pytest.raises(ConfigError, match=r"server\.api_keys"):
        load_settings(config, env={})


def test_cli_client_commands_send_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth_headers(parser().parse_args(["status", "--api-key", "k1"])) == {"Authorization": "Bearer k1"}
    monkeypatch.setenv("MLXPOOL_API_KEY", "k2")
    for command in (["status"], ["health"], ["load", "m"], ["unload", "m"]):
        assert auth_headers(parser().parse_args(command)) == {"Authorization": "Bearer k2"}
    monkeypatch.delenv("MLXPOOL_API_KEY")
    assert auth_headers(parser().parse_args(["health"])) == {}


def test_cli_reports_a_refused_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxpool import cli

    def refuse(url: str, **kwargs: object) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key"}}, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", refuse)
    assert cli.main(["status", "--url", "http://x", "--api-key", "nope"]) == 1


def test_only_loopback_hosts_count_as_private() -> None:
    from mlxpool.server import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.20", "my-mac.local"]))
