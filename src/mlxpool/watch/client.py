"""HTTP calls to the server, retried with backoff while the failure is the server's state, not the request's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("mlxpool.watch")

DEFAULT_URL = "http://127.0.0.1:8787"
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
"""Busy, restarting or out of memory for now: worth asking again."""


class ServerError(Exception):
    """A request the server refused or kept failing; the file it was for goes to failed/."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerUnreachableError(ServerError):
    """No connection to the server for longer than the client waits."""


class ServerAuthError(ServerError):
    """The server wants another API key: no file can succeed until the setting is fixed."""


class ServerClient:
    """Requests to one server. A refused connection (the server is down or restarting) is retried for
    `unreachable_wait` seconds (None: forever); 429/502/503/504, timeouts and connections cut mid-request
    are retried `retries` times. The delay doubles from `first_delay` up to `max_delay`; a `Retry-After`
    header is honoured."""

    def __init__(
        self,
        url: str,
        *,
        retries: int = 5,
        timeout: float = 3600.0,
        unreachable_wait: float | None = None,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.retries = retries
        self.unreachable_wait = unreachable_wait
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body).json()

    def post_form(self, path: str, data: dict[str, str], files: dict[str, tuple[str, bytes]]) -> Any:
        return self.request("POST", path, data=data, files=files).json()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response to a request, after retrying transient failures; ServerError when it fails for good."""
        failures, refused, waited = 0, 0, 0.0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if self.unreachable_wait is not None and waited >= self.unreachable_wait:
                    raise ServerUnreachableError(f"cannot reach the server at {self.url}: {exc}") from exc
                refused += 1
                delay = self._delay(refused)
                waited += delay
                self._pause(delay, f"server unreachable at {self.url} ({exc})")
                continue
            except httpx.TransportError as exc:
                failures += 1
                self._give_up_after(failures, f"{method} {path}: {type(exc).__name__}: {exc}")
                self._pause(self._delay(failures), f"{type(exc).__name__} on {method} {path}")
                continue
            refused, waited = 0, 0.0
            if response.status_code in TRANSIENT_STATUS:
                failures += 1
                self._give_up_after(failures, _describe(response), response.status_code)
                wait = max(self._delay(failures), _retry_after(response))
                self._pause(min(wait, self.max_delay), _describe(response))
                continue
            if response.status_code in (401, 403):
                raise ServerAuthError(f"{_describe(response)} (set --api-key or MLXPOOL_API_KEY)", response.status_code)
            if response.is_error:
                raise ServerError(_describe(response), response.status_code)
            return response

    def _give_up_after(self, failures: int, message: str, status: int | None = None) -> None:
        if failures > self.retries:
            raise ServerError(f"{message} (after {self.retries} retries)", status)

    def _delay(self, attempt: int) -> float:
        return float(min(self.first_delay * 2 ** (attempt - 1), self.max_delay))

    def _pause(self, seconds: float, why: str) -> None:
        log.warning("%s; retrying in %.1f s", why, seconds)
        self.sleep(seconds)


def _describe(response: httpx.Response) -> str:
    """`503 memory_budget_exceeded: ...` from an OpenAI error body, else the status and text."""
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0
