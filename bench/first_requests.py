"""The first requests after a start on a machine whose MLX kernel cache is empty, with and without the warm-up.

    python bench/first_requests.py --shape qwen3-0.6b --out r.json   # GPU machine
    python bench/first_requests.py --shape tiny                      # CPU

For each arm (models' `warmup` on, off) a server starts with an empty kernel cache of its own (`MLX_PTX_CACHE_DIR`,
and the driver's `CUDA_CACHE_PATH`) and preloads a chat and an embedding model. Measured: the time to ready, the
kernels compiled by then, and then, at once, the fairness load (64 chat streams, an embedding probe beside them):
chat first-token and embedding latencies, and the kernels compiled during it; then the same load again (warm).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import chat
import embeddings
import load
import output


def kernels(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.ptx"))


def start(config: str, workdir: Path, port: int, kernel_dir: Path) -> tuple[subprocess.Popen[bytes], float]:
    path = workdir / "first.toml"
    path.write_text(f'[server]\nports = [{port}]\nlog_level = "info"\n' + config)
    command, env = chat.mlxpool_command(None)
    env = {**env, "MLX_PTX_CACHE_DIR": str(kernel_dir), "CUDA_CACHE_PATH": str(kernel_dir / "driver")}
    started = time.perf_counter()
    process = subprocess.Popen([*command, "serve", "--config", str(path)], env=env)
    chat.wait_up(f"http://127.0.0.1:{port}", process, "/health/ready")
    return process, time.perf_counter() - started


def one_arm(chat_path: Path, embedding_path: Path, warmup: bool, streams: int, seconds: float,
            workdir: Path) -> dict[str, Any]:  # fmt: skip
    kernel_dir = workdir / f"kernels-{'warm' if warmup else 'cold'}"
    kernel_dir.mkdir()
    config = (
        f'[models.chat]\nkind = "chat"\npath = "{chat_path}"\npreload = true\nmax_batch_size = 64\n'
        f"warmup = {str(warmup).lower()}\n"
        f'[models.embedding]\nkind = "embedding"\npath = "{embedding_path}"\npreload = true\n'
        f"warmup = {str(warmup).lower()}\n"
    )
    port = chat.free_port()
    url = f"http://127.0.0.1:{port}"
    process, ready_s = start(config, workdir, port, kernel_dir)
    at_ready = kernels(kernel_dir)
    result: dict[str, Any] = {"warmup": warmup, "ready_s": round(ready_s, 2), "kernels_at_ready": len(at_ready)}
    seen = set(at_ready)
    try:
        chat_lane, probe_lane = load.Lane("chat", streams, "chat"), load.Lane("embeddings", 1, "embedding")
        for name in ("first", "again"):
            chat_records, probe_records = asyncio.run(load.beside(url, [chat_lane], [probe_lane], seconds))
            summary = load.summarize(chat_records, seconds + load.LEAD) | load.summarize(probe_records, seconds)
            now = kernels(kernel_dir)
            summary["kernels_after"], summary["kernels_compiled"] = len(now), [k for k in now if k not in seen]
            seen.update(now)
            summary["chat"]["first_token_ms"]["max"] = max(
                (1000 * r.first_token for r in chat_records if r.first_token is not None), default=None
            )
            summary["embeddings"]["latency_ms"]["max"] = max((1000 * r.seconds for r in probe_records), default=None)
            result[name] = summary
    finally:
        process.terminate()
        process.wait(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--arms", default="cold,warm", help="order of the arms, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load.COMPLETIONS = args.shape != "tiny"  # the real-shape models have no chat template
    result: dict[str, Any] = {"shape": args.shape, "arms": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        chat_path = chat.build_model(args.shape, workdir / "chat")
        embedding_path = embeddings.build_model(args.shape, workdir / "embedding")
        for arm in args.arms.split(","):
            result["arms"].append(
                one_arm(chat_path, embedding_path, arm == "warm", args.streams, args.seconds, workdir)
            )
    output.report(result, args.out)
    for arm in result["arms"]:
        first = arm["first"]
        print(
            f"warmup={arm['warmup']}: ready {arm['ready_s']} s, kernels {arm['kernels_at_ready']} at ready, "
            f"{first['kernels_after']} after the first load; first load: chat TTFT p99 "
            f"{first['chat']['first_token_ms']['p99']:.0f} ms (max {first['chat']['first_token_ms']['max']:.0f}), "
            f"embedding p99 {first['embeddings']['latency_ms']['p99']:.1f} ms "
            f"(max {first['embeddings']['latency_ms']['max']:.0f}); again: TTFT p99 "
            f"{arm['again']['chat']['first_token_ms']['p99']:.0f} ms, embedding p99 "
            f"{arm['again']['embeddings']['latency_ms']['p99']:.1f} ms"
        )


if __name__ == "__main__":
    main()
