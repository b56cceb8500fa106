"""The `mlxpool` command: serve, and a few client commands over the admin API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from mlxpool.config import Settings, load_settings, settings_from_dict
from mlxpool.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8787"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mlxpool: bad configuration\n{exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"mlxpool: cannot reach the server at {args.url}: {exc}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mlxpool", description="Local OpenAI-compatible server over a pool of MLX models."
    )
    commands = top.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="models.toml to use (default: $MLXPOOL_CONFIG, else the shipped one)")
    serve.add_argument("--demo", action="store_true", help="serve tiny random-weight demo models (offline)")
    serve.add_argument("--host", help="address to bind (overrides the config)")
    serve.add_argument("--port", type=int, action="append", help="port to bind; repeat for several")
    serve.set_defaults(func=cmd_serve, url=None)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=os.environ.get("MLXPOOL_URL", DEFAULT_URL), help="server address")
    commands.add_parser("status", parents=[client], help="the pool's models, states and memory").set_defaults(
        func=cmd_status
    )
    commands.add_parser("health", parents=[client], help="exit 0 when the server is ready").set_defaults(
        func=cmd_health
    )
    for verb in ("load", "unload"):
        sub = commands.add_parser(verb, parents=[client], help=f"{verb} a model now")
        sub.add_argument("name")
        sub.set_defaults(func=cmd_load_unload, verb=verb)
    return top


def serve_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.demo:
        from mlxpool.demo import demo_config

        root = Path(settings.server.cache_dir).expanduser() / "demo"
        demo = settings_from_dict(demo_config(root), root / "demo.toml", os.environ)
        settings = demo.model_copy(update={"server": settings.server, "source": f"demo models in {root}"})
    update: dict[str, Any] = {}
    if args.host:
        update["host"] = args.host
    if args.port:
        update["ports"] = args.port
    return settings.model_copy(update={"server": settings.server.model_copy(update=update)})


def cmd_serve(args: argparse.Namespace) -> int:
    from mlxpool.server import bind, run

    settings = serve_settings(args)
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        sockets = bind(settings.server.host, settings.server.ports)
    except OSError as exc:
        where = f"{settings.server.host} port(s) {settings.server.ports}"
        print(f"mlxpool: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    run(settings, sockets)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = httpx.get(f"{args.url}/admin/models", timeout=10).raise_for_status().json()
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    rows = [("MODEL", "KIND", "STATE", "LEASES", "MEMORY", "IDLE", "NOTE")]
    for m in status["models"]:
        memory = _gib(m["measured_bytes"]) if m["measured_bytes"] is not None else _gib(m["estimated_bytes"], "~")
        idle = "-" if m["idle_seconds"] is None else f"{m['idle_seconds']:.0f}s"
        rows.append((m["name"], m["kind"], m["state"], str(m["leases"]), memory, idle, m["error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    lines.append(f"memory: {_gib(status['used_bytes'])} of {_gib(status['budget_bytes'])} budget in use")
    return "\n".join(line.rstrip() for line in lines)


def cmd_health(args: argparse.Namespace) -> int:
    response = httpx.get(f"{args.url}/health/ready", timeout=10)
    print(response.json().get("status", response.text))
    return 0 if response.status_code == 200 else 1


def cmd_load_unload(args: argparse.Namespace) -> int:
    response = httpx.post(f"{args.url}/admin/models/{args.name}/{args.verb}", timeout=None)
    body = response.json()
    if response.status_code != 200:
        print(f"mlxpool: {body['error']['message']}", file=sys.stderr)
        return 1
    print(f"{body['name']}: {body['state']}")
    return 0


def _gib(n: int | None, prefix: str = "") -> str:
    return "-" if not n else f"{prefix}{n / 2**30:.2f} GiB" if n >= 2**28 else f"{prefix}{n / 2**20:.1f} MiB"
