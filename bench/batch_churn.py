"""What a decode step costs when the running batch changes between steps, against a steady batch.

    python bench/batch_churn.py --shape qwen3-0.6b --out r.json

A continuous batch changes between decode steps whenever a sequence finishes (mlx-lm filters it out: every
layer's cache is gathered into new, smaller arrays) or a group joins (every layer's cache is padded and
concatenated). Each pattern below runs `--steps` decode steps of a batch of about `--rows` sequences, changing it
before every step; each step is timed (wall and the thread's CPU):

- steady: no change;
- swap: one sequence leaves and one joins (the size stays);
- alternate: one leaves, then one joins (the size moves by one every step);
- cycle: the size moves over 17 values (fewer for batches under 17 rows), every step;
- overwrite: one sequence's cache rows are overwritten in place (the shapes stay): what reusing a finished
  sequence's slot would cost.

Each MLX setting (`--envs`) runs in its own process, since MLX reads them once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chat
import output
from load import percentile

ENVS = {
    "default": {},
    "graph_cache_4000": {"MLX_CUDA_GRAPH_CACHE_SIZE": "4000"},
    "no_cuda_graphs": {"MLX_USE_CUDA_GRAPHS": "0"},
}


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q) or 0.0, 2) for q in (50, 90, 99, 100)}


def run_patterns(shape: str, rows: int, steps: int, prompt: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load

    from mlxpool.engines.batching import ContinuousBatch

    with tempfile.TemporaryDirectory() as tmp:
        model = load(str(chat.build_model(shape, Path(tmp) / "chat")))[0]
    vocab = model.args.vocab_size
    batch = ContinuousBatch(model, [], max_batch_size=4 * rows, group_size=rows, prefill_step_size=4096)

    def add(n: int) -> None:
        for _ in range(n):
            tokens = [int(t) for t in mx.random.randint(1, vocab - 1, (prompt,)).tolist()]
            batch.insert(tokens, None, [], None, [], 10**9)
        while not batch._admit():
            pass

    def drop(n: int) -> None:  # now, as mlx-lm's batch does (mlxpool's waits until a quarter have finished)
        batch.running.filter(list(range(n, len(batch.running))))
        batch.running.compact()

    def overwrite() -> None:
        row = 0
        for c in batch.running.prompt_cache:
            fresh = mx.random.normal((1, c.keys.shape[1], prompt, c.keys.shape[3])).astype(c.keys.dtype)
            c.keys[row : row + 1, :, c._idx - prompt : c._idx] = fresh
            c.values[row : row + 1, :, c._idx - prompt : c._idx] = fresh
            c.left_padding[row] = c._idx - prompt
            c.offset[row] = prompt

    def size_for(i: int) -> int:
        return rows - (i * 7) % min(17, rows)

    def resize(target: int) -> None:
        if target < len(batch.running):
            drop(len(batch.running) - target)
        elif target > len(batch.running):
            add(target - len(batch.running))

    changes: dict[str, Callable[[int], None]] = {
        "steady": lambda i: None,
        "swap": lambda i: (drop(1), add(1)),  # type: ignore[func-returns-value]
        "alternate": lambda i: drop(1) if i % 2 == 0 else add(1),
        "cycle": lambda i: resize(size_for(i)),
        "overwrite": lambda i: overwrite(),
    }
    add(rows)
    for _ in range(20):  # warm up the steady shapes
        batch.running.next()
    result: dict[str, Any] = {}
    for name, change in [*changes.items(), ("steady_again", changes["steady"])]:
        resize(rows)
        for _ in range(3):
            batch.running.next()
        walls, cpus = [], []
        for i in range(steps):
            change(i)
            wall, cpu = time.perf_counter(), time.thread_time()
            batch.running.next()
            walls.append(1000 * (time.perf_counter() - wall))
            cpus.append(1000 * (time.thread_time() - cpu))
        result[name] = {"wall_ms": percentiles(walls), "cpu_ms": percentiles(cpus), "rows_at_end": len(batch.running)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--envs", default="default,graph_cache_4000,no_cuda_graphs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_patterns(args.shape, args.rows, args.steps, args.prompt)))
        return
    results: dict[str, Any] = {"shape": args.shape, "rows": args.rows, "steps": args.steps, "prompt": args.prompt}
    for env in args.envs.split(","):
        command = [sys.executable, __file__, "--child", "--shape", args.shape, "--rows", str(args.rows),
                   "--steps", str(args.steps), "--prompt", str(args.prompt)]  # fmt: skip
        out = subprocess.run(command, env={**os.environ, **ENVS[env]}, capture_output=True, text=True, check=True)
        results[env] = json.loads(out.stdout.splitlines()[-1])
        print(env, json.dumps({k: v["wall_ms"]["p50"] for k, v in results[env].items()}), flush=True)
    output.report(results, args.out)


if __name__ == "__main__":
    main()
