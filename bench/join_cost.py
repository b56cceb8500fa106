"""What it costs a running batch when a group of newcomers joins it, part by part, each part waited for.

    python bench/join_cost.py --shape qwen3-0.6b --out r.json

The setting of the fairness load: a batch of 32 sequences decoding, and a group of newcomers whose prompts are
all in the prompt cache but their last token. Timed (median of `--repeat`, after one warm-up): fetching the
cached prefixes (mlx-lm's deep copies, or views that share the entry's arrays), merging them into one batch
cache, mlx-lm's copy of that batch when it splits the group off, the group's first token, extending the running
batch, and the decode step after; against a plain decode step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chat
import mlx.core as mx
import output


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat + 1):
        mx.synchronize()
        start = time.perf_counter()
        out = fn()
        if out is not None:
            mx.eval(out)
        mx.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return {"first_ms": round(times[0], 2), "median_ms": round(statistics.median(times[1:]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--groups", default="4,8,32")
    parser.add_argument("--running", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mlx_lm import load
    from mlx_lm.generate import PromptProcessingBatch, StopSequences
    from mlx_lm.models.cache import KVCache, LRUPromptCache, make_prompt_cache

    from mlxpool.engines.sampling import Sampler

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load(str(chat.build_model(args.shape, Path(tmp) / "chat")))[:2]
    vocab = model.args.vocab_size
    sampler, stops = Sampler(0.0), StopSequences([[vocab - 1]])
    prompt = [int(t) for t in mx.random.randint(1, vocab - 1, (args.prompt,)).tolist()]

    def prompt_batch(caches: list[list[Any]], tokens: list[list[int]]) -> Any:
        n = len(caches)
        return PromptProcessingBatch(
            model, list(range(n)), caches, tokens, samplers=[sampler] * n, fallback_sampler=sampler,
            logits_processors=[()] * n, stop_sequences=[stops] * n, max_tokens=[10_000] * n,
        )  # fmt: skip

    # One finished sequence's cache (its prompt and 128 tokens of answer), as the prompt cache holds it.
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt + prompt])[:, : args.prompt + 128], cache=entry))
    store = LRUPromptCache(max_size=8)
    store.insert_cache("m", prompt + prompt[:128], entry)

    def deep_copies(n: int) -> list[list[Any]]:
        out = []
        for _ in range(n):
            cache, _rest = store.fetch_nearest_cache("m", prompt)
            out.append(cache)
        return out

    def views(n: int) -> list[list[Any]]:
        out = []
        for _ in range(n):
            rows = []
            for layer in entry:
                view = KVCache()
                view.keys, view.values, view.offset = layer.keys, layer.values, args.prompt - 1
                rows.append(view)
            out.append(rows)
        return out

    # The running batch: `running` sequences that read the prompt and decoded a while.
    fresh = prompt_batch([make_prompt_cache(model) for _ in range(args.running)], [[] for _ in range(args.running)])
    fresh.prompt([prompt[:-1]] * args.running)
    running = fresh.generate([[prompt[-1]]] * args.running)
    for _ in range(64):
        running.next()
    result: dict[str, Any] = {"shape": args.shape, "device": str(mx.default_device()), "running": args.running}
    result["decode"] = timed(lambda: running.next() and None, args.repeat)
    for n in (int(g) for g in args.groups.split(",")):
        rows: dict[str, Any] = {}
        rows["fetch_deep_copies"] = timed(lambda n=n: [c.state for cs in deep_copies(n) for c in cs], args.repeat)
        rows["fetch_views"] = timed(lambda n=n: [c.state for cs in views(n) for c in cs], args.repeat)
        rows["merge"] = timed(lambda n=n: [c.state for c in prompt_batch(views(n), [[]] * n).prompt_cache], args.repeat)
        group = prompt_batch(views(n), [prompt[:-1] for _ in range(n)])
        mx.eval([c.state for c in group.prompt_cache])
        rows["split_copy"] = timed(lambda g=group: [c.state for c in g._copy().prompt_cache], args.repeat)
        rows["first_token"] = timed(
            lambda n=n: prompt_batch(views(n), [prompt[:-1] for _ in range(n)]).generate([[prompt[-1]]] * n)
            and None, args.repeat
        )  # fmt: skip
        joins, decodes, filters = [], [], []
        for _ in range(args.repeat + 1):
            newcomers = prompt_batch(views(n), [prompt[:-1] for _ in range(n)]).generate([[prompt[-1]]] * n)
            mx.synchronize()
            start = time.perf_counter()
            running.extend(newcomers)
            mx.eval([c.state for c in running.prompt_cache])
            mx.synchronize()
            joins.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            running.next()
            mx.synchronize()
            decodes.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            running.filter(list(range(args.running)))
            mx.eval([c.state for c in running.prompt_cache])
            mx.synchronize()
            filters.append(1000 * (time.perf_counter() - start))
        for name, times in (("extend", joins), ("decode_after_join", decodes), ("filter_back", filters)):
            rows[name] = {"first_ms": round(times[0], 2), "median_ms": round(statistics.median(times[1:]), 2)}
        result[f"group_{n}"] = rows
    output.report(result, args.out)


if __name__ == "__main__":
    main()
