"""How long the first step of a new shape takes, against the same step again: the stalls a continuous batch meets
when its batch size or prompt lengths change (GPU backends compile kernels per shape, on the one MLX thread).

    python bench/shape_stalls.py --shape qwen3-0.6b --out r.json

For batch sizes, temperatures and prompt lengths not seen before, times (each `mx.eval`'d): mlx-lm's sampler (an
`mx.compile`d function) against mlxpool's (engines/sampling.py), a decode step of the model, and a prefill.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import chat
import mlx.core as mx
import output


def timed(fn: Any) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return 1000 * (time.perf_counter() - start)


def first_and_again(fn: Any) -> dict[str, float]:
    return {"first_ms": round(timed(fn), 2), "again_ms": round(timed(fn), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--batches", default="5,17,33,47,63,3,29")
    parser.add_argument("--lengths", default="77,100,131,200")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from mlxpool.engines.sampling import Sampler

    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    result: dict[str, Any] = {"shape": args.shape, "device": str(mx.default_device())}
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load(str(chat.build_model(args.shape, Path(tmp) / "chat")))[:2]
    vocab = model.args.vocab_size
    theirs, ours = make_sampler(temp=0.7), Sampler(0.7)
    warm = mx.random.normal((8, vocab)).astype(mx.bfloat16)
    mx.eval(theirs(warm), ours(warm))  # whatever is compiled once, not per shape
    rows: dict[str, list[dict[str, Any]]] = {"mlx_lm_sampler": [], "mlxpool_sampler": [], "decode": [], "prefill": []}
    for b in batches:
        logprobs = mx.random.normal((b, vocab)).astype(mx.bfloat16)
        mx.eval(logprobs)
        rows["mlx_lm_sampler"].append({"batch": b, **first_and_again(lambda x=logprobs: theirs(x))})
        rows["mlxpool_sampler"].append({"batch": b, **first_and_again(lambda x=logprobs: ours(x))})
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((b, 128), mx.int32), cache=cache))
        token = mx.zeros((b, 1), mx.int32)
        rows["decode"].append({"batch": b, **first_and_again(lambda t=token, c=cache: model(t, cache=c))})
    for t in (0.3, 0.5, 0.9):  # the same batch, a temperature not seen before
        for name, sampler in (("mlx_lm", make_sampler(temp=t, top_p=0.9)), ("mlxpool", Sampler(t, top_p=0.9))):
            again = first_and_again(lambda s=sampler: s(warm))
            rows.setdefault(f"{name}_sampler_new_temperature", []).append({"temperature": t, **again})
    for n in lengths:
        prompt = mx.zeros((4, n), mx.int32)
        again = first_and_again(lambda p=prompt: model(p, cache=make_prompt_cache(model)))
        rows["prefill"].append({"batch": 4, "length": n, **again})
    result |= rows
    output.report(result, args.out)
    for name, entries in rows.items():
        worst = max(entries, key=lambda e: e["first_ms"])
        print(f"{name}: worst first call {worst['first_ms']:.1f} ms ({worst}), again {worst['again_ms']:.1f} ms")


if __name__ == "__main__":
    main()
