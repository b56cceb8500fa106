from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from mlxpool.watch.client import ServerAuthError, ServerClient, ServerError, ServerUnreachableError
from tests.watch.fakeserver import error


def scripted(*answers: httpx.Response | Exception) -> tuple[ServerClient, list[float], list[httpx.Request]]:
    """A client whose server gives `answers` in turn (an exception: the connection fails so), then 200s."""
    sleeps: list[float] = []
    seen: list[httpx.Request] = []
    script: Iterator[httpx.Response | Exception] = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(script, httpx.Response(200, json={"ok": True}))
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = ServerClient("http://mlxpool", transport=httpx.MockTransport(handler), sleep=sleeps.append, retries=3)
    return client, sleeps, seen


def busy(retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    return httpx.Response(503, json=error("no memory now", "memory_budget_exceeded"), headers=headers)


def test_503_is_retried_with_growing_delays_and_retry_after() -> None:
    client, sleeps, _ = scripted(busy(), busy("4"), busy(), httpx.Response(502))
    with pytest.raises(ServerError, match=r"502 Bad Gateway.*after 3 retries") as caught:
        client.get_json("/v1/models")
    assert sleeps == [0.5, 4.0, 2.0] and caught.value.status == 502
    client, sleeps, seen = scripted(busy(), httpx.Response(429))
    assert client.get_json("/v1/models") == {"ok": True}
    assert sleeps == [0.5, 1.0] and len(seen) == 3


def test_a_refused_connection_waits_for_the_server_without_limit() -> None:
    refused = [httpx.ConnectError("Connection refused") for _ in range(12)]
    client, sleeps, _ = scripted(*refused)
    assert client.post_json("/v1/chat/completions", {}) == {"ok": True}
    assert sleeps[:4] == [0.5, 1.0, 2.0, 4.0] and max(sleeps) == 30.0 and len(sleeps) == 12


def test_a_refused_connection_gives_up_after_unreachable_wait() -> None:
    client, sleeps, _ = scripted(*[httpx.ConnectError("Connection refused") for _ in range(10)])
    client.unreachable_wait = 3.0
    with pytest.raises(ServerUnreachableError, match="cannot reach the server at http://mlxpool"):
        client.get_json("/health")
    assert sleeps == [0.5, 1.0, 2.0]


def test_a_connection_cut_mid_request_counts_as_a_retry() -> None:
    client, sleeps, _ = scripted(httpx.RemoteProtocolError("server disconnected"), httpx.ReadTimeout("slow"))
    assert client.get_json("/x") == {"ok": True} and sleeps == [0.5, 1.0]


def test_client_errors_are_not_retried() -> None:
    client, sleeps, seen = scripted(httpx.Response(400, json=error("file: the audio is silent", "invalid_audio")))
    with pytest.raises(ServerError, match=r"^400 invalid_audio: file: the audio is silent$") as caught:
        client.post_form("/v1/audio/transcriptions", {"model": "whisper-1"}, {"file": ("a.wav", b"x")})
    assert caught.value.status == 400 and sleeps == [] and len(seen) == 1


def test_a_refused_key_is_an_auth_error_and_the_key_is_sent() -> None:
    client, _, seen = scripted(httpx.Response(401, json=error("invalid API key", "invalid_api_key")))
    client.http.headers["Authorization"] = "Bearer wrong"
    with pytest.raises(ServerAuthError, match="401 invalid_api_key"):
        client.get_json("/v1/models")
    assert seen[0].headers["authorization"] == "Bearer wrong"
    keyed = ServerClient("http://x", api_key="k1", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert keyed.http.headers["authorization"] == "Bearer k1"
