"""One uvicorn server, one event loop, every configured port."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from mlxpool.api import create_app
from mlxpool.config import Settings

log = logging.getLogger(__name__)


def bind(host: str, ports: list[int]) -> list[socket.socket]:
    """Listening sockets for `host` on each port (bound before serving, so a taken port fails fast)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.create_server((host, port), family=family, backlog=2048) for port in ports]


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    server_settings = settings.server
    config = uvicorn.Config(
        create_app(settings),
        log_level=server_settings.log_level,
        timeout_graceful_shutdown=10,
        access_log=server_settings.log_level == "debug",
    )
    urls = [f"http://{server_settings.host}:{s.getsockname()[1]}" for s in sockets]
    log.info("mlxpool listening on %s (config: %s)", " and ".join(urls), settings.source)
    await uvicorn.Server(config).serve(sockets=sockets)


def run(settings: Settings, sockets: list[socket.socket]) -> None:
    asyncio.run(serve(settings, sockets))
