"""Issue 8's budget soak and leak scenarios on their own server, in one run (CPU).

    python bench/soak_scenarios.py --seconds 600 --cycles 100 --out results.json

Builds four tiny models (chat, embedding, asr, tts), each with a 4 MiB working reserve under a 12 MiB budget, so
at most two fit; serves them with mlxpool and runs bench/load.py's `soak` (chat 2 streams, embeddings, asr and
tts 1 worker each, memory sampled every 100 ms) and then its `leaks` (load/unload cycles of each model).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import chat
import load
import output
from pool_scenarios import start

from mlxpool.demo import build_tiny_chat, build_tiny_qwen3_embedding
from mlxpool.demo_audio import build_tiny_kitten_tts, build_tiny_whisper

BUILDERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "chat": ("chat", build_tiny_chat),
    "emb": ("embedding", build_tiny_qwen3_embedding),
    "asr": ("asr", build_tiny_whisper),
    "tts": ("tts", build_tiny_kitten_tts),
}
LANES = [load.Lane("chat", 2, "chat"), load.Lane("embeddings", 1, "emb"), load.Lane("asr", 1, "asr"),
         load.Lane("tts", 1, "tts")]  # fmt: skip


def tight_config(root: Path) -> str:
    """The four models under a budget that holds two; it continues the [server] table that `start` opens."""
    tables = [
        f'[models.{name}]\nkind = "{kind}"\npath = "{build(root / name)}"\nmemory_reserve = "4MiB"\n'
        for name, (kind, build) in BUILDERS.items()
    ]
    return 'memory_budget = "12MiB"\nload_timeout = 20\n' + "\n".join(tables)


async def scenarios(url: str, seconds: float, cycles: int) -> dict[str, Any]:
    return {
        "soak": await load.soak(url, LANES, seconds),
        "leaks": await load.leaks(url, list(BUILDERS), cycles),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trace", type=Path, help="write mlxpool's worker-step timeline here (bench/step_trace.py)")
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = chat.free_port()
        process = start(tight_config(workdir), workdir, port, args.trace)
        try:
            result = asyncio.run(scenarios(f"http://127.0.0.1:{port}", args.seconds, args.cycles))
        finally:
            process.terminate()
            process.wait(timeout=60)
    output.report(result, args.out)


if __name__ == "__main__":
    main()
