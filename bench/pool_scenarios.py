"""Issue 8's fairness, cold-load and connections scenarios on their own server, in one run (GPU machine or CPU).

    python bench/pool_scenarios.py --shape qwen3-0.6b --out results.json   # real-shape random models (GPU)
    python bench/pool_scenarios.py --shape tiny                            # the tiny demo models (CPU)

Builds a chat model and an embedding model (and a second chat model to cold-load) with random weights, serves
them with mlxpool, and runs bench/load.py's `fairness`, `cold-load` and `connections` against it; then the same
`connections` load against mlx_lm.server on the same chat model.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import chat
import embeddings
import load
import output


def start(config: str, workdir: Path, port: int, trace: Path | None = None) -> subprocess.Popen[bytes]:
    path = workdir / "pool.toml"
    path.write_text(f'[server]\nports = [{port}]\nlog_level = "warning"\n' + config)
    command, env = chat.mlxpool_command(trace)
    process = subprocess.Popen([*command, "serve", "--config", str(path)], env=env)
    chat.wait_up(f"http://127.0.0.1:{port}", process, "/health/ready")
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--cold-streams", type=int, default=16)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--probe-pause", type=float, default=0.0, help="seconds between the fairness probe's requests")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scenarios", default="fairness,cold-load,connections", help="which to run, comma-separated")
    parser.add_argument("--trace", type=Path, help="write mlxpool's worker-step timeline here (bench/step_trace.py)")
    args = parser.parse_args()
    scenarios = set(args.scenarios.split(","))
    result: dict[str, Any] = {"shape": args.shape}
    load.COMPLETIONS = args.shape != "tiny"  # the real-shape models have no chat template
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        chat_path = chat.build_model(args.shape, workdir / "chat")
        cold_path = workdir / "cold"
        shutil.copytree(chat_path, cold_path)
        embedding_path = embeddings.build_model(args.shape, workdir / "embedding")
        config = (
            f'[models.chat]\nkind = "chat"\npath = "{chat_path}"\npreload = true\nmax_batch_size = 64\n'
            f'[models.embedding]\nkind = "embedding"\npath = "{embedding_path}"\npreload = true\n'
            f'[models.cold]\nkind = "chat"\npath = "{cold_path}"\n'
        )
        port = chat.free_port()
        url = f"http://127.0.0.1:{port}"
        process = start(config, workdir, port, args.trace)
        try:
            if "fairness" in scenarios:
                result["fairness"] = asyncio.run(
                    load.fairness(url, "chat", "embedding", args.streams, args.seconds, args.probe_pause)
                )
            if "cold-load" in scenarios:
                result["cold_load"] = asyncio.run(load.cold_load(url, "chat", "cold", args.cold_streams, args.seconds))
            if "connections" in scenarios:
                result["connections"] = asyncio.run(load.connections(url, "chat", args.clients))
        finally:
            process.terminate()
            process.wait(timeout=60)
        if "connections" in scenarios:
            port = chat.free_port()
            server = chat.start_mlx_lm_server(chat_path, port)
            try:
                result["mlx_lm_server_connections"] = asyncio.run(
                    load.connections(f"http://127.0.0.1:{port}", str(chat_path), args.clients)
                )
            finally:
                server.terminate()
                server.wait(timeout=60)
    output.report(result, args.out)
    print(_headline(result))


def _headline(r: dict[str, Any]) -> str:
    lines = []
    if f := r.get("fairness"):
        lines.append(
            f"fairness: embedding p99 {f['busy']['embeddings']['latency_ms']['p99']:.1f} ms under load vs "
            f"{f['idle']['embeddings']['latency_ms']['p99']:.1f} idle = {f['p99_ratio']:.2f}x (pass {f['pass']})"
        )
    if c := r.get("cold_load"):
        lines.append(
            f"cold load: chat {c['during_load']['chat']['tokens_per_s']:.0f} tok/s while loading vs "
            f"{c['alone']['chat']['tokens_per_s']:.0f} = {c['throughput_ratio']:.2f} (pass {c['pass']})"
        )
    if n := r.get("connections"):
        m = r["mlx_lm_server_connections"]
        lines.append(
            f"connections: mlxpool errors {n['summary']['chat']['errors']} (pass {n['pass']}); "
            f"mlx_lm.server errors {m['summary']['chat']['errors']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
