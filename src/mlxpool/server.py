"""One uvicorn server, one event loop, every configured port."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import uvicorn

from mlxpool.api import create_app
from mlxpool.config import Settings

log = logging.getLogger(__name__)


def bind(host: str, ports: list[int]) -> list[socket.socket]:
    """Listening sockets for `host` on each port (bound before serving, so a taken port fails fast).

    The sockets carry proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without
    it every keep-alive response waits ~40 ms on Nagle's algorithm and the client's delayed ACK.
    """
    sockets = []
    for port in ports:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        sockets.append(sock)
    return sockets


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (127.0.0.1, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    server_settings = settings.server
    config = uvicorn.Config(
        create_app(settings),
        log_level=server_settings.log_level,
        timeout_graceful_shutdown=10,
        http=server_settings.http_parser,
        log_config=None,  # uvicorn's records go to mlxpool's handlers (stderr and the log file)
        access_log=False,  # mlxpool.api.access logs each request
    )
    urls = [f"http://{server_settings.host}:{s.getsockname()[1]}" for s in sockets]
    log.info("mlxpool listening on %s (config: %s)", " and ".join(urls), settings.source)
    if not server_settings.api_keys and not is_loopback(server_settings.host):
        log.warning("no API keys are set: anyone who can reach %s may use this server", server_settings.host)
    await uvicorn.Server(config).serve(sockets=sockets)


def run(settings: Settings, sockets: list[socket.socket]) -> None:
    asyncio.run(serve(settings, sockets))
