"""Embeddings through the server against a direct mlx-embeddings call on the same model.

Measures (docs/benchmarks.md):
  1. throughput of N concurrent single-sentence requests vs the same N requests one at a time;
  2. per-request overhead: the server's p50 latency (HTTP -> pool -> worker -> response, client included)
     minus the p50 of a direct library call (tokenize + forward + copy out) on the same sentence and model.

    python bench/embeddings.py --model DIR            # a model directory (e.g. models/minilm-l6-v2)
    python bench/embeddings.py --shape tiny           # build the tiny demo Qwen3 embedder
    python bench/embeddings.py --shape qwen3-0.6b     # random weights in Qwen3-Embedding-0.6B's shape (bf16)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx

QWEN3_06B = {
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669,
}  # fmt: skip


def sentences(n: int) -> list[str]:
    return [f"Sentence number {i} is about topic {i % 7} and nothing else." for i in range(n)]


def build_model(shape: str, root: Path) -> Path:
    from mlxpool.demo import build_tiny_qwen3_embedding

    if shape == "tiny":
        return build_tiny_qwen3_embedding(root / "tiny")
    import mlx.core as mx

    path = build_tiny_qwen3_embedding(root / shape, **QWEN3_06B)
    weights = cast(dict[str, mx.array], mx.load(str(path / "model.safetensors")))
    mx.save_safetensors(str(path / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
    return path


def direct_latencies(path: Path, texts: list[str]) -> dict[str, float]:
    """p50/p90 of one library call per sentence: tokenize, forward, evaluate, copy to numpy.

    Every sentence is run once before timing: GPU backends compile kernels for each new input shape.
    """
    import mlx.core as mx
    import numpy as np
    from mlx_embeddings.utils import load

    model, tokenizer = load(str(path))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def call(text: str) -> np.ndarray:
        ids = tokenizer(text)["input_ids"]
        if eos and ids[-1] != eos[0]:
            ids = ids + eos
        out = model(mx.array([ids]), attention_mask=mx.ones((1, len(ids)), dtype=mx.int32)).text_embeds
        mx.eval(out)
        return np.array(out.astype(mx.float32))

    for text in texts:
        call(text)
    times = []
    for text in texts:
        start = time.perf_counter()
        call(text)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def through_worker(path: Path, texts: list[str], rounds: int) -> dict[str, Any]:
    """The same requests straight into the engine on the worker thread, without HTTP: splits the overhead."""
    from mlxpool.config import ModelSpec
    from mlxpool.engines.embedding import load_embedding
    from mlxpool.worker import Worker

    async def run() -> dict[str, Any]:
        worker = Worker()
        worker.start()
        spec = ModelSpec(name="bench", kind="embedding", path=str(path), max_batch_size=len(texts))
        engine, _ = await worker.run(load_embedding(spec, path, worker))
        worker.add_engine(engine)
        sequences = [engine.tokenize([t]) for t in texts]
        for _ in range(2):
            await asyncio.gather(*(engine.embed(s) for s in sequences))
        latencies, concurrent = [], []
        for _ in range(rounds):
            for s in sequences:
                start = time.perf_counter()
                await engine.embed(s)
                latencies.append(time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*(engine.embed(s) for s in sequences))
            concurrent.append(len(texts) / (time.perf_counter() - start))
        worker.stop()
        return {"latency": percentiles(latencies), "concurrent_rps": statistics.median(concurrent)}

    return asyncio.run(run())


def in_process(path: Path, texts: list[str], rounds: int) -> dict[str, Any]:
    """Sequential requests through the whole app in this process (no sockets, no uvicorn)."""
    from mlxpool.api import create_app
    from mlxpool.config import settings_from_dict

    models = {"bench": {"kind": "embedding", "path": str(path), "preload": True, "max_batch_size": len(texts)}}
    app = create_app(settings_from_dict({"models": models}, path / "bench.toml", {}))

    async def run() -> dict[str, Any]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=300) as client:
                while not app.state.pool.ready:
                    await asyncio.sleep(0.05)
                latencies = []
                for i in range(rounds + 1):
                    for t in texts:
                        start = time.perf_counter()
                        response = await client.post("/v1/embeddings", json={"model": "bench", "input": t})
                        response.raise_for_status()
                        if i:  # the first round warms up
                            latencies.append(time.perf_counter() - start)
        return {"latency": percentiles(latencies)}

    return asyncio.run(run())


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "n": len(ordered),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(path: Path, port: int, batch: int, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\nports = [{port}]\nlog_level = "warning"\n'
        f'[models.bench]\nkind = "embedding"\npath = "{path}"\npreload = true\nmax_batch_size = {batch}\n'
    )
    process = subprocess.Popen([sys.executable, "-m", "mlxpool", "serve", "--config", str(config)])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit("server exited before it was ready")
        time.sleep(0.2)
    raise SystemExit("server not ready in 600 s")


async def one(client: aiohttp.ClientSession, text: str) -> float:
    start = time.perf_counter()
    async with client.post("/v1/embeddings", json={"model": "bench", "input": text}) as response:
        await response.read()
        response.raise_for_status()
    return time.perf_counter() - start


async def engine_stats(client: aiohttp.ClientSession) -> dict[str, Any]:
    async with client.get("/admin/models") as response:
        stats: dict[str, Any] = (await response.json())["models"][0]["engine"]
    return stats


async def through_server(port: int, texts: list[str], rounds: int) -> dict[str, Any]:
    # aiohttp, not httpx, drives the load: httpx's client spends ~5 ms of CPU per request at 64 concurrent
    # connections and would measure itself instead of the server.
    connector = aiohttp.TCPConnector(limit=len(texts))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as client:
        for _ in range(2):  # warm-up: connections, kernels for every batch shape
            await asyncio.gather(*(one(client, t) for t in texts))
            for t in texts[:10]:
                await one(client, t)
        sequential, concurrent, latencies, bursts = [], [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for t in texts:
                latencies.append(await one(client, t))
            sequential.append(len(texts) / (time.perf_counter() - start))
            before = await engine_stats(client)
            start = time.perf_counter()
            await asyncio.gather(*(one(client, t) for t in texts))
            elapsed = time.perf_counter() - start
            concurrent.append(len(texts) / elapsed)
            after = await engine_stats(client)
            batches = after["batches"] - before["batches"]
            busy = after["busy_seconds"] - before["busy_seconds"]
            bursts.append({"seconds": elapsed, "batches": batches, "forward_seconds": busy})
        health = []
        for _ in range(100):
            start = time.perf_counter()
            async with client.get("/health") as response:
                await response.read()
            health.append(time.perf_counter() - start)
        async with client.get("/admin/models") as response:
            admin = (await response.json())["models"][0]
    return {
        "sequential_rps": statistics.median(sequential),
        "concurrent_rps": statistics.median(concurrent),
        "latency": percentiles(latencies),
        "health_latency": percentiles(health),
        "batches": admin["engine"]["batches"],
        "bursts": bursts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an embedding model directory")
    source.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], help="build a random-weight model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = args.model.resolve() if args.model else build_model(args.shape, workdir)
        texts = sentences(args.requests)
        import mlx.core as mx

        device = str(mx.default_device())
        direct = direct_latencies(path, texts)
        worker = through_worker(path, texts, args.rounds)
        app = in_process(path, texts, args.rounds)
        port = free_port()
        server = start_server(path, port, args.requests, workdir)
        try:
            served = asyncio.run(through_server(port, texts, args.rounds))
        finally:
            server.terminate()
            server.wait(timeout=60)

    result = {
        "model": args.shape or str(args.model),
        "device": device,
        "requests": args.requests,
        "direct": direct,
        "worker": worker,
        "in_process_app": app,
        "server": served,
        "concurrency_speedup": served["concurrent_rps"] / served["sequential_rps"],
        "overhead_p50_ms": served["latency"]["p50_ms"] - direct["p50_ms"],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{result['model']} on {device}: {args.requests} concurrent {served['concurrent_rps']:.0f} req/s vs "
        f"one at a time {served['sequential_rps']:.0f} req/s = {result['concurrency_speedup']:.1f}x; "
        f"p50 server {served['latency']['p50_ms']:.2f} ms vs direct {direct['p50_ms']:.2f} ms = "
        f"+{result['overhead_p50_ms']:.2f} ms\n  split: worker path p50 {worker['latency']['p50_ms']:.2f} ms "
        f"({worker['concurrent_rps']:.0f} req/s at {args.requests} concurrent), in-process app p50 "
        f"{app['latency']['p50_ms']:.2f} ms, HTTP floor (GET /health) p50 "
        f"{served['health_latency']['p50_ms']:.2f} ms, {served['batches']} batches in total"
    )
    burst = served["bursts"][len(served["bursts"]) // 2]
    print(
        f"  a concurrent burst: {burst['seconds'] * 1e3:.1f} ms, {burst['batches']} forward passes taking "
        f"{burst['forward_seconds'] * 1e3:.1f} ms on the worker"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
