"""What mlxpool's event loop spends per streamed token, for each HTTP parser.

    python bench/loop_cost.py --shape tiny --streams 64 --seconds 20 --rounds 3 --out r.json

Serves one chat model (random weights, bench/chat.py's shapes) once per arm (the `http_parser` setting: h11 or
httptools), arms interleaved round by round, and streams `--streams` chat requests at it from a process of its
own for `--seconds`. It reads the CPU time of the server's main thread (the event loop: every token of every
stream passes through it as one server-sent event) from /proc before and after, and reports it per streamed token,
beside the tokens/s. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import chat
import load
import output
from pool_scenarios import start

ARMS = ("h11", "httptools")


def measure(url: str, pid: int, streams: int, seconds: float, tokens: int) -> dict[str, Any]:
    lanes = [load.Lane("chat", streams, "chat")]
    load.run_lanes_in_process(url, lanes, 3.0, tokens, load.COMPLETIONS)  # warm-up: every batch size once
    loop_before, wall = load.thread_cpu_seconds(pid, pid), time.perf_counter()
    records = load.run_lanes_in_process(url, lanes, seconds, tokens, load.COMPLETIONS)
    loop_cpu, wall = load.thread_cpu_seconds(pid, pid) - loop_before, time.perf_counter() - wall
    streamed = sum(r.tokens for r in records if r.error is None)
    return {
        "tokens": streamed,
        "tokens_per_s": round(streamed / wall, 1),
        "errors": sum(r.error is not None for r in records),
        "loop_cpu_s": round(loop_cpu, 3),
        "loop_busy": round(loop_cpu / wall, 3),
        "loop_cpu_us_per_token": round(1e6 * loop_cpu / max(streamed, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], default="tiny")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each chat request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS), help="http_parser values, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load.COMPLETIONS = args.shape != "tiny"  # the real-shape models have no chat template
    arms = args.arms.split(",")
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = chat.build_model(args.shape, workdir / "chat")
        for _ in range(args.rounds):
            for arm in arms:
                config = (
                    f'http_parser = "{arm}"\n'
                    f'[models.chat]\nkind = "chat"\npath = "{model}"\npreload = true\nmax_batch_size = {args.streams}\n'
                )
                port = chat.free_port()
                process = start(config, workdir, port)
                try:
                    run = measure(f"http://127.0.0.1:{port}", process.pid, args.streams, args.seconds, args.tokens)
                finally:
                    process.terminate()
                    process.wait(timeout=60)
                runs[arm].append(run)
                print(arm, run, flush=True)
    result = {"shape": args.shape, "streams": args.streams, "seconds": args.seconds, "runs": runs}
    result["median_loop_cpu_us_per_token"] = {
        arm: statistics.median(r["loop_cpu_us_per_token"] for r in rs) for arm, rs in runs.items()
    }
    output.report(result, args.out)


if __name__ == "__main__":
    main()
