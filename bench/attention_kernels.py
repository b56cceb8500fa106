"""MLX's CUDA attention with and without cuDNN: what each costs a continuous batch, a long prompt and a long decode.

    python bench/attention_kernels.py --shape qwen3-0.6b --out r.json

On CUDA, MLX runs prompt reading (more than one query token) through cuDNN's fused attention, which builds an
execution plan for every new combination of shapes it meets (batch rows, tokens read, keys, mask). A continuous
batch meets new combinations all the time (group sizes and prompt lengths vary). Each case runs in a child process
with `MLX_CUDA_USE_CUDNN_SDPA` set to 1 and to 0 (MLX reads it once):
- `groups`: newcomers of random prompt lengths admitted into mlxpool's batch (engines/batching.py, 512 prompt
  tokens per step) while 32 sequences decode: the admission steps' total and longest time, per group.
- `long_prompt`: one 8,192-token prompt read 512 tokens a step, twice (the second time every shape is known).
- `long_decode`: one sequence decoding 64 tokens after a 4,096-token prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_cases(shape: str) -> dict[str, Any]:
    import chat
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from mlxpool.engines.batching import ContinuousBatch

    with tempfile.TemporaryDirectory() as tmp:
        model = load(str(chat.build_model(shape, Path(tmp) / "chat")))[0]
    vocab = model.args.vocab_size
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab - 1) for _ in range(n)]

    batch = ContinuousBatch(model, [vocab - 1], max_batch_size=64, group_size=32, prefill_step_size=512)
    for _ in range(32):
        batch.insert(tokens(128), None, [], greedy_sampler, [], 10**6)
    while len(batch.running) < 32:
        batch.next()
    for _ in range(8):
        batch.next()
    groups = []
    for size in (4, 8, 16, 24, 32, 12, 28, 6):
        uids = {batch.insert(tokens(rng.randrange(64, 384)), None, [], greedy_sampler, [], 4) for _ in range(size)}
        steps: list[float] = []
        while any(uid not in batch.running.uids for uid in uids):
            tic = time.perf_counter()
            decoded = batch.next()[1]
            mx.synchronize()  # the step's work is done
            if not decoded:
                steps.append(1000 * (time.perf_counter() - tic))
        groups.append({"rows": size, "admission_ms": round(sum(steps), 1), "longest_ms": round(max(steps), 1)})
        batch.remove(list(uids))

    def read(prompt: list[int]) -> tuple[Any, float]:
        cache, tic = make_prompt_cache(model), time.perf_counter()
        for i in range(0, len(prompt), 512):
            mx.eval(model(mx.array([prompt[i : i + 512]]), cache=cache))
        return cache, 1000 * (time.perf_counter() - tic)

    long = tokens(8192)
    first, again = read(long)[1], read(long)[1]
    cache, _ = read(tokens(4096))
    token, tic = mx.array([[1]]), time.perf_counter()
    for _ in range(64):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    decode = 64 / (time.perf_counter() - tic)
    return {
        "groups": groups,
        "groups_admission_ms": round(sum(g["admission_ms"] for g in groups), 1),
        "groups_longest_ms": max(g["longest_ms"] for g in groups),
        "long_prompt": {"first_ms": round(first, 1), "again_ms": round(again, 1)},
        "long_decode_tokens_per_s": round(decode, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_cases(args.shape)))
        return
    result: dict[str, Any] = {"shape": args.shape}
    for setting in ("1", "0"):
        env = {**os.environ, "MLX_CUDA_USE_CUDNN_SDPA": setting}
        child = [sys.executable, __file__, "--shape", args.shape, "--child"]
        out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
        result[f"cudnn_{setting}"] = json.loads(out.splitlines()[-1])
        print(setting, json.dumps(result[f"cudnn_{setting}"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
