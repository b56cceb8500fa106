"""What one request costs mlxpool's event loop, per route, in waves of concurrent requests.

    python bench/request_cost.py --waves 8 --size 64 --out r.json

Serves the tiny chat and embedding models (bench/chat.py's and bench/embeddings.py's shapes, random weights),
sends waves of `--size` concurrent requests of each kind (each wave on new connections, as a burst of new clients
would), and reads the CPU time of the server's main thread (the event loop) from /proc before and after: what the
loop spends per request, the number to multiply by a wave's size for how long other requests wait behind it.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import chat
import embeddings
import httpx
import load
import output
from pool_scenarios import start

PROMPT = "hello there " * 10
COMPLETION = {"model": "chat", "prompt": PROMPT, "max_tokens": 1}
CASES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "health": ("GET", "/health", None),
    "embedding": ("POST", "/v1/embeddings", {"model": "embedding", "input": PROMPT}),
    "completion": ("POST", "/v1/completions", COMPLETION),
    "completion_stream_1": ("POST", "/v1/completions", COMPLETION | {"stream": True}),
    "completion_stream_8": ("POST", "/v1/completions", COMPLETION | {"max_tokens": 8, "stream": True}),
    "chat_stream_1": (
        "POST", "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "stream": True},
    ),
}  # fmt: skip


async def wave(url: str, size: int, case: str) -> None:
    method, path, body = CASES[case]
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=size)) as client:

        async def one() -> None:
            async with client.stream(method, path, json=body) as response:
                async for _ in response.aiter_bytes():
                    pass
                if response.status_code != 200:
                    raise RuntimeError(f"{case}: HTTP {response.status_code}")

        await asyncio.gather(*(one() for _ in range(size)))


def measure(url: str, pid: int, case: str, waves: int, size: int) -> float:
    """The loop's CPU milliseconds per request of `case` (after one unmeasured wave)."""
    asyncio.run(wave(url, size, case))
    before = load.thread_cpu_seconds(pid, pid)
    for _ in range(waves):
        asyncio.run(wave(url, size, case))
    return round(1000 * (load.thread_cpu_seconds(pid, pid) - before) / (waves * size), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="concurrent requests per wave")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        chat_path = chat.build_model("tiny", workdir / "chat")
        embedding_path = embeddings.build_model("tiny", workdir / "embedding")
        config = (
            f'[models.chat]\nkind = "chat"\npath = "{chat_path}"\npreload = true\nmax_batch_size = {args.size}\n'
            f'[models.embedding]\nkind = "embedding"\npath = "{embedding_path}"\npreload = true\n'
        )
        port = chat.free_port()
        process = start(config, workdir, port)
        try:
            costs = {
                case: measure(f"http://127.0.0.1:{port}", process.pid, case, args.waves, args.size) for case in CASES
            }
        finally:
            process.terminate()
            process.wait(timeout=60)
    result = {"waves": args.waves, "size": args.size, "loop_cpu_ms_per_request": costs}
    output.report(result, args.out)


if __name__ == "__main__":
    main()
