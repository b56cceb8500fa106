"""The `mlxpool` command: serve, and a few client commands over the admin API."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from mlxpool import litellm, logs, service
from mlxpool.config import ModelSpec, Settings, human_bytes, load_settings, parse_size, settings_from_dict
from mlxpool.errors import ConfigError, MlxpoolError
from mlxpool.pool.downloads import DownloadPlan, Progress
from mlxpool.watch.cli import add_commands as add_watch_commands

DEFAULT_URL = "http://127.0.0.1:8787"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mlxpool: bad configuration\n{exc}", file=sys.stderr)
        return 2
    except httpx.HTTPStatusError as exc:
        print(
            f"mlxpool: the server at {args.url} answered {exc.response.status_code}: {exc.response.text}",
            file=sys.stderr,
        )
        return 1
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
    client.add_argument(
        "--api-key", default=os.environ.get("MLXPOOL_API_KEY"), help="API key (default: $MLXPOOL_API_KEY)"
    )
    commands.add_parser("status", parents=[client], help="the pool's models, states and memory").set_defaults(
        func=cmd_status
    )
    commands.add_parser("health", parents=[client], help="exit 0 when the server is ready").set_defaults(
        func=cmd_health
    )
    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument("--config", help="models.toml to use (default: $MLXPOOL_CONFIG, else the shipped one)")
    download = commands.add_parser("download", parents=[offline], help="fetch models from the hub now")
    download.add_argument("names", nargs="*", metavar="NAME", help="models (names or aliases) to fetch")
    download.add_argument("--all", action="store_true", help="every configured model")
    download.add_argument("--dry-run", action="store_true", help="show what would be fetched, fetch nothing")
    download.set_defaults(func=cmd_download, url=None)
    models = commands.add_parser("models", parents=[offline], help="configured models: size, on disk, fits")
    models.set_defaults(func=cmd_models, url=None)

    for verb in ("load", "unload"):
        sub = commands.add_parser(verb, parents=[client], help=f"{verb} a model now")
        sub.add_argument("name")
        sub.set_defaults(func=cmd_load_unload, verb=verb)
    logs.add_commands(commands)
    service.add_commands(commands)
    litellm.add_commands(commands)
    add_watch_commands(commands)
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
    try:
        logs.configure(settings.server, "server")
    except OSError as exc:
        print(f"mlxpool: cannot write the log in {settings.server.logs_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        sockets = bind(settings.server.host, settings.server.ports)
    except OSError as exc:
        where = f"{settings.server.host} port(s) {settings.server.ports}"
        print(f"mlxpool: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    run(settings, sockets)
    return 0


def machine_settings(args: argparse.Namespace) -> Settings:
    from mlxpool.device import machine_memory

    return load_settings(args.config).for_memory(machine_memory())


def cmd_download(args: argparse.Namespace) -> int:
    from mlxpool.pool.downloads import download

    settings = machine_settings(args)
    specs = chosen_models(settings, args.names, args.all)
    plans, failed = plan_downloads(specs)
    if args.dry_run or not plans:
        return 1 if failed else 0
    for name, todo in plans.items():
        spec = settings.models[name]
        initial = todo.total - todo.missing
        with tqdm(total=todo.total, initial=initial, unit="B", unit_scale=True, desc=name, file=sys.stdout) as bar:
            try:
                download(spec, Progress(on_update=bar.update), todo)
            except MlxpoolError as exc:
                failed[name] = exc.message
    ok = [name for name in plans if name not in failed]
    print(f"downloaded: {', '.join(ok) or 'nothing'}")
    for name, why in failed.items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def chosen_models(settings: Settings, names: list[str], every: bool) -> list[ModelSpec]:
    if every:
        return list(settings.models.values())
    if not names:
        raise SystemExit("mlxpool download: name the models to fetch, or give --all")
    table = settings.name_table()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"mlxpool download: unknown model(s): {', '.join(unknown)}; see `mlxpool models`")
    return [settings.models[table[n]] for n in dict.fromkeys(names)]


def plan_downloads(specs: list[ModelSpec]) -> tuple[dict[str, DownloadPlan], dict[str, str]]:
    """Ask the hub what each model needs; print it with the total and the free disk."""
    from huggingface_hub import constants

    from mlxpool.pool.downloads import plan

    plans: dict[str, DownloadPlan] = {}
    failed: dict[str, str] = {}
    rows = [("MODEL", "SOURCE", "FILES", "SIZE", "TO FETCH")]
    for spec in specs:
        if spec.path is not None:
            rows.append((spec.name, spec.path, "-", "local", "0 B"))
            continue
        try:
            todo = plan(spec)
        except MlxpoolError as exc:
            failed[spec.name] = exc.message
            rows.append((spec.name, spec.source, "?", "?", "failed"))
            continue
        rows.append((spec.name, spec.source, str(len(todo.files)), human_bytes(todo.total), human_bytes(todo.missing)))
        plans[spec.name] = todo
    print(table(rows))
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    missing = sum(p.missing for p in plans.values())
    print(f"to fetch: {human_bytes(missing)}; free in {cache}: {human_bytes(shutil.disk_usage(cache).free)}")
    for name, why in failed.items():
        print(f"cannot plan {name}: {why}", file=sys.stderr)
    return plans, failed


def cmd_models(args: argparse.Namespace) -> int:
    from mlxpool.device import usable_memory
    from mlxpool.pool import sources

    settings = machine_settings(args)
    budget = parse_size(settings.server.memory_budget, usable_memory())
    rows = [("MODEL", "KIND", "SOURCE", "ON DISK", "ESTIMATE", "FITS")]
    for spec in settings.models.values():
        on_disk, estimate = model_disk_state(spec)
        fits = "?" if estimate is None else "yes" if estimate <= budget else "no"
        rows.append((spec.name, spec.kind, spec.source, on_disk, human_bytes(estimate), fits))
    print(table(rows))
    print(
        f"memory budget: {human_bytes(budget)} ({settings.server.memory_budget}); estimates are weights from "
        f"safetensors headers plus a per-kind reserve ({human_bytes(sources.KIND_RESERVE['embedding'])} for "
        "embeddings up to 2 GiB for chat)"
    )
    return 0


def model_disk_state(spec: ModelSpec) -> tuple[str, int | None]:
    """("yes" | "no" | "partial" | "local" | "missing", estimate in bytes or None when it cannot be had)."""
    from mlxpool.pool import downloads, sources

    try:
        path = sources.cached_dir(spec)
    except FileNotFoundError:
        return "missing", None
    if path is not None:
        return "local" if spec.path else "yes", sources.estimate_bytes(spec, path)
    partial = downloads.has_partial(spec)
    try:
        return ("partial" if partial else "no"), sources.remote_weights_bytes(spec) + sources.reserve_bytes(spec)
    except MlxpoolError:
        return ("partial" if partial else "no"), None


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    """The `Authorization` header for a server with API keys, when a key was given."""
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def cmd_status(args: argparse.Namespace) -> int:
    status = httpx.get(f"{args.url}/admin/models", headers=auth_headers(args), timeout=10).raise_for_status().json()
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    rows = [("MODEL", "KIND", "STATE", "LEASES", "MEMORY", "IDLE", "NOTE")]
    for m in status["models"]:
        measured, estimated = m["measured_bytes"], m["estimated_bytes"]
        memory = human_bytes(measured) if measured is not None else "~" + human_bytes(estimated) if estimated else "-"
        idle = "-" if m["idle_seconds"] is None else f"{m['idle_seconds']:.0f}s"
        note = m["error"] or ""
        if m.get("download"):
            done, total = m["download"]["done_bytes"], m["download"]["total_bytes"]
            note = f"downloading {done / max(total, 1):.0%} of {human_bytes(total)}"
        rows.append((m["name"], m["kind"], m["state"], str(m["leases"]), memory, idle, note))
    budget = f"memory: {human_bytes(status['used_bytes'])} of {human_bytes(status['budget_bytes'])} budget in use"
    return table(rows) + "\n" + budget


def cmd_health(args: argparse.Namespace) -> int:
    response = httpx.get(f"{args.url}/health/ready", headers=auth_headers(args), timeout=10)
    print(response.json().get("status", response.text))
    return 0 if response.status_code == 200 else 1


def cmd_load_unload(args: argparse.Namespace) -> int:
    response = httpx.post(f"{args.url}/admin/models/{args.name}/{args.verb}", headers=auth_headers(args), timeout=None)
    body = response.json()
    if response.status_code != 200:
        print(f"mlxpool: {body['error']['message']}", file=sys.stderr)
        return 1
    print(f"{body['name']}: {body['state']}")
    return 0
