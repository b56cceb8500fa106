"""Real sockets: `python -m mlxpool serve --demo` on two ports, the CLI against it, and a clean shutdown."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Running:
    process: subprocess.Popen[str]
    ports: list[int]
    env: dict[str, str]

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mlxpool", *args, "--url", self.url(1)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=self.env)


def wait_ready(
    url: str, process: subprocess.Popen[Any], timeout: float = 90, path: str = "/health/ready", log: Path | None = None
) -> None:
    """Until `url` + `path` answers 200. If the process exits first, or never answers, the message carries its
    output: `log` (where it writes) or, once it has exited, its stderr pipe."""

    def output() -> str:
        if log is not None:
            return log.read_text()[-3000:]
        return str(process.stderr.read()) if process.stderr and process.poll() is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited:\n{output()}"
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}{path} not ready in {timeout} s:\n{output()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    ports = free_ports(2)
    env = {
        **os.environ,
        "MLXPOOL_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "MLXPOOL_PORTS": ",".join(map(str, ports)),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mlxpool", "serve", "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{ports[0]}", process)
        yield Running(process, ports, env)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_both_ports_serve_every_route(server: Running) -> None:
    for i in (0, 1):
        client = openai.OpenAI(base_url=f"{server.url(i)}/v1", api_key="unused")
        response = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        assert len(response.data) == 2 and len(response.data[0].embedding) == 32
        assert {m.id for m in client.models.list().data} >= {"demo-embedding", "demo-bert"}
        assert httpx.get(f"{server.url(i)}/health").json() == {"status": "ok"}


def test_the_demo_serves_chat_vision_and_ocr(server: Running) -> None:
    client = openai.OpenAI(base_url=f"{server.url(1)}/v1", api_key="unused")
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert answer.model == "demo-chat" and answer.choices[0].finish_reason == "length"
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 128, 255)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    seen = client.chat.completions.create(
        model="demo-vision", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0
    )
    assert seen.usage is not None and seen.usage.completion_tokens == 4
    files = {"file": ("a.png", png.getvalue())}
    ocr = httpx.post(f"{server.url(0)}/v1/ocr", data={"model": "demo-ocr"}, files=files, timeout=120)
    assert ocr.status_code == 200 and len(ocr.json()["pages"]) == 1


def test_cli_status_health_load_unload(server: Running) -> None:
    health = server.cli("health")
    assert health.returncode == 0 and "ready" in health.stdout
    loaded = server.cli("load", "demo-bert")
    assert loaded.returncode == 0 and loaded.stdout.strip() == "demo-bert: ready"
    status = server.cli("status")
    assert status.returncode == 0
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:-1]}
    assert rows["demo-bert"][1:3] == ["embedding", "ready"] and rows["demo-embedding"][2] == "ready"
    assert "budget in use" in status.stdout.splitlines()[-1]
    unloaded = server.cli("unload", "demo-bert")
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == "demo-bert: absent"
    missing = server.cli("load", "no-such-model")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_cli_reports_an_unreachable_server(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    result = subprocess.run(
        [sys.executable, "-m", "mlxpool", "status", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot reach the server" in result.stderr


def test_oversized_headers_get_400_and_the_server_stays_up(server: Running) -> None:
    # httptools (installed for the tests) accepts headers of any size; the default parser, h11, must be in use.
    with socket.create_connection(("127.0.0.1", server.ports[0]), timeout=30) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server.url(0)}/health", timeout=10).status_code == 200


def test_a_taken_port_fails_fast_with_a_message(server: Running) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlxpool", "serve", "--demo", "--port", str(server.ports[0])],
        capture_output=True,
        text=True,
        timeout=120,
        env=server.env,
    )
    assert result.returncode == 1 and "cannot listen" in result.stderr


def test_sigterm_shuts_down_cleanly(server: Running) -> None:
    server.process.send_signal(signal.SIGTERM)
    _, log = server.process.communicate(timeout=30)
    # uvicorn finishes its shutdown, then re-raises the signal so the exit status tells it was asked to stop.
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url(0)}/health", timeout=2)


def test_listening_sockets_are_tcp_so_asyncio_disables_nagle() -> None:
    # Regression: sockets with proto 0 made every keep-alive response wait ~40 ms (Nagle + delayed ACK).
    from mlxpool.server import bind

    sockets = bind("127.0.0.1", free_ports(2))
    try:
        assert [s.proto for s in sockets] == [socket.IPPROTO_TCP] * 2
    finally:
        for s in sockets:
            s.close()
