"""Generation throughput: mlxpool's server against mlx-lm's own loops and mlx_lm.server, in one run.

    python bench/chat.py --shape qwen3-0.6b        # random weights in Qwen3-0.6B's shape, bf16 (GPU)
    python bench/chat.py --shape tiny              # the tiny demo chat model (CPU)

Prompts of `--prompt-tokens` random words, `--new-tokens` generated (greedy), streamed through /v1/completions.
Reports, per client count: aggregate generated tokens/s, TTFT p50/p99, failed requests; plus the raw
BatchGenerator loop at the largest count and single-stream `stream_generate` decode speed, each also run beside
every measured round of the server (`--rounds`) so their ratios are taken seconds apart.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx

QWEN3_06B = {
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}  # fmt: skip


PREFILL_BATCH_SIZE = 32
PREFILL_STEP_SIZE = 4096


def build_model(shape: str, root: Path) -> Path:
    """A Qwen3 causal LM with random weights and a word-level tokenizer covering its whole vocabulary."""
    if shape == "tiny":
        from mlxpool.demo import build_tiny_chat

        return build_tiny_chat(root / "tiny")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = root / shape
    path.mkdir(parents=True)
    vocab = {f"w{i}": i for i in range(QWEN3_06B["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Qwen3's real tokenizer is byte-level BPE, which mlx-lm detokenizes incrementally (BPEStreamingDetokenizer,
    # ~4 us a token); without a decoder it would re-decode each sequence's whole text at every token (~22 us).
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    eos = QWEN3_06B["vocab_size"] - 1
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"w{eos}", "model_max_length": 40960})
    )
    config = {"model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1e6, "eos_token_id": eos, **QWEN3_06B}
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    parameters = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    weights = {k: v.astype(mx.bfloat16) for k, v in parameters}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def prompts(n: int, length: int, vocab: int | None) -> list[str]:
    """`n` different prompts of about `length` tokens: random words of the word-level vocabulary, or (tiny model,
    `vocab` None) random strings of "hello"/"world", a token each."""
    rng = random.Random(0)
    if vocab is None:
        return [" ".join(rng.choice(("hello", "world")) for _ in range(length)) for _ in range(n)]
    return [" ".join(f"w{rng.randrange(1, vocab - 1)}" for _ in range(length)) for _ in range(n)]


class RawLoop:
    """mlx-lm's BatchGenerator driven directly, all prompts inserted at once: the ceiling for batched decoding.
    Loaded once; `run` can be called between server loads, so both are measured in the same minutes."""

    def __init__(self, path: Path):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))[:2]

    def run(self, texts: list[str], new_tokens: int) -> dict[str, float]:
        from mlx_lm.generate import BatchGenerator

        ids = [self.tokenizer.encode(t) for t in texts]
        generator = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=64,
            prefill_batch_size=PREFILL_BATCH_SIZE,  # the same setting as the server's
        )
        generator.insert(ids, max_tokens=[new_tokens] * len(ids))
        start, tokens, steps = time.perf_counter(), 0, []
        while True:
            tic = time.perf_counter()
            if not (responses := generator.next_generated()):  # type: ignore[no-untyped-call]
                break
            steps.append(time.perf_counter() - tic)
            tokens += len(responses)
        seconds = time.perf_counter() - start
        return {"tokens_per_s": tokens / seconds, "tokens": tokens, "step_ms_p50": 1000 * statistics.median(steps)}

    def stream(self, text: str, new_tokens: int) -> dict[str, float]:
        """mlx-lm's `stream_generate` for one sequence: its decode speed (prompt excluded) as `tokens_per_s`."""
        from mlx_lm import stream_generate

        responses = list(stream_generate(self.model, self.tokenizer, text, max_tokens=new_tokens))
        return {"tokens_per_s": responses[-1].generation_tps}


def engine_direct(path: Path, texts: list[str], new_tokens: int) -> dict[str, float]:
    """mlxpool's chat engine stepped directly on this thread, all prompts at once: no HTTP, no event loop traffic,
    no worker thread. Against the raw loop it is the engine's own cost; against the server, the serving cost."""
    from mlxpool.config import ModelSpec
    from mlxpool.engines.chat import SamplingParams, Sequence, load_chat

    spec = ModelSpec(name="bench", kind="chat", path=str(path), max_batch_size=64, prompt_cache_size=8,
                     prefill_batch_size=PREFILL_BATCH_SIZE, prefill_step_size=PREFILL_STEP_SIZE)  # fmt: skip
    task = load_chat(spec, path, None)  # type: ignore[arg-type]
    try:
        while True:
            next(task)
    except StopIteration as done:
        engine = done.value

    async def run(batch: list[str]) -> tuple[int, float, list[float]]:
        for text in batch:
            ids = engine.tokenizer.encode(text)
            sequence = Sequence(
                ids, SamplingParams(new_tokens, temperature=0), asyncio.Queue(), engine.tokenizer.detokenizer
            )
            engine._incoming.append(sequence)
        start, steps, tokens = time.perf_counter(), [], engine.generated_tokens
        while engine.has_work():
            tic = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - tic)
        return engine.generated_tokens - tokens, time.perf_counter() - start, steps

    half = len(texts) // 2
    asyncio.run(run(texts[:half]))  # warm-up
    tokens, seconds, steps = asyncio.run(run(texts[half:]))
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "step_ms_p50": 1000 * statistics.median(steps)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.args!r}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not up in 600 s")


def mlxpool_command(trace: Path | None) -> tuple[list[str], dict[str, str]]:
    """`mlxpool` itself, or with bench/step_trace.py's timeline of worker steps written to `trace` on exit."""
    if trace is None:
        return [sys.executable, "-m", "mlxpool"], dict(os.environ)
    script = Path(__file__).with_name("step_trace.py")
    return [sys.executable, str(script)], {**os.environ, "MLXPOOL_STEP_TRACE": str(trace)}


def start_mlxpool(path: Path, port: int, workdir: Path, trace: Path | None = None) -> subprocess.Popen[bytes]:
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\nports = [{port}]\nlog_level = "warning"\n'
        f'[models.bench]\nkind = "chat"\npath = "{path}"\npreload = true\nmax_batch_size = 64\n'
        f"prefill_batch_size = {PREFILL_BATCH_SIZE}\nprefill_step_size = {PREFILL_STEP_SIZE}\n"
    )
    command, env = mlxpool_command(trace)
    process = subprocess.Popen([*command, "serve", "--config", str(config)], env=env)
    wait_up(f"http://127.0.0.1:{port}", process, "/health/ready")
    return process


def start_mlx_lm_server(path: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "mlx_lm.server",
        "--model",
        str(path),
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    process = subprocess.Popen(command)
    wait_up(f"http://127.0.0.1:{port}", process, "/v1/models")
    return process


async def one_stream(client: aiohttp.ClientSession, model: str, text: str, new_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens received) for one streamed completion."""
    body = {"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens, usage = time.perf_counter(), None, 0, None
    async with client.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                first = first or time.perf_counter() - start
            usage = chunk.get("usage") or usage
    # A server may send several tokens in one chunk: trust its usage count when it gives one.
    return first or float("nan"), usage["completion_tokens"] if usage else tokens


async def load_test(
    port: int,
    model: str,
    texts: list[str],
    clients: int,
    new_tokens: int,
    warmups: int,
    rounds: int = 1,
    between: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """`warmups` unmeasured runs of `clients` concurrent streams, then `rounds` measured ones (medians reported);
    `between`, when given, runs before each measured round (the raw loop) and its results are kept beside."""
    batches = iter(texts[i * clients : (i + 1) * clients] for i in range(warmups + rounds))
    measured, beside = [], []

    def session() -> aiohttp.ClientSession:
        # A new one per load: while the raw loop runs beside (8 s on the CPU) the server closes idle keep-alive
        # connections (uvicorn: after 5 s), and a request written on one of those fails at once.
        connector = aiohttp.TCPConnector(limit=clients)
        timeout = aiohttp.ClientTimeout(total=1200)
        return aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector, timeout=timeout)

    # Warm-up: the same load, so kernels for the batch shapes it produces are compiled (GPU backends compile per
    # new shape, and arrival timing decides which batch sizes occur).
    for _ in range(warmups):
        async with session() as client:
            await asyncio.gather(*(one_stream(client, model, t, new_tokens) for t in next(batches)))
    for _ in range(rounds):
        if between is not None:
            beside.append(between())
        async with session() as client:
            batch, start = next(batches), time.perf_counter()
            results = await asyncio.gather(
                *(one_stream(client, model, t, new_tokens) for t in batch), return_exceptions=True
            )
            measured.append((results, time.perf_counter() - start))
    rows: list[dict[str, Any]] = []
    for results, seconds in measured:
        done = [r for r in results if isinstance(r, tuple)]
        errors = sorted({repr(r)[:200] for r in results if not isinstance(r, tuple)})
        ttfts = sorted(r[0] for r in done)
        rows.append({
            "tokens_per_s": sum(r[1] for r in done) / seconds,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "failed": len(results) - len(done),
            "errors": errors,
            "tokens_per_request": sorted({r[1] for r in done}),
            "seconds": seconds,
        })  # fmt: skip
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")
    median = {k: statistics.median(vs) if (vs := [r[k] for r in rows if r[k] is not None]) else None for k in keys}
    out = {"clients": clients, **median, "failed": sum(row["failed"] for row in rows), "rounds": rows}
    if beside:
        out["beside_rounds"] = beside
        out["beside_tokens_per_s"] = statistics.median(b["tokens_per_s"] for b in beside)
        out["ratio_to_beside"] = statistics.median(
            row["tokens_per_s"] / b["tokens_per_s"] for row, b in zip(rows, beside, strict=True)
        )
    return out


def serve_and_measure(
    which: str, path: Path, texts: list[str], counts: list[int], args: Any, workdir: Path, raw: RawLoop
) -> list[dict[str, Any]]:
    """Each client count: warm-ups, then `--rounds` measured loads. Before each measured load the baseline runs
    in this process: the raw loop at the largest count, `stream_generate` at one client; each round's ratio
    compares runs seconds apart (the GPU machine's speed drifts by up to 40% over minutes)."""
    port = free_port()
    process = start_mlxpool(path, port, workdir, args.trace) if which == "mlxpool" else start_mlx_lm_server(path, port)
    model = "bench" if which == "mlxpool" else str(path)
    results, used = [], 0
    try:
        for n in counts:  # each load gets prompts no earlier load sent, unless --repeat-prompts
            batch = texts if args.repeat_prompts else texts[used:]
            between = None
            if n == max(counts):
                between = functools.partial(raw.run, texts[:n], args.new_tokens)
            elif n == 1:
                between = functools.partial(raw.stream, texts[0], args.new_tokens)
            load = load_test(port, model, batch, n, args.new_tokens, args.warmups, args.rounds, between)
            results.append(asyncio.run(load))
            used += n * (args.warmups + args.rounds)
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], required=True)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--skip-mlx-lm-server", action="store_true")
    parser.add_argument("--warmups", type=int, default=1, help="unmeasured runs of each load before the measured one")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs of each load (medians are reported)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trace", type=Path, help="write mlxpool's worker-step timeline here (bench/step_trace.py)")
    parser.add_argument("--prefill-batch-size", type=int, default=32, help="for mlxpool's model and the raw loop alike")
    parser.add_argument(
        "--prefill-step-size", type=int, default=4096,
        help="mlxpool's prompt tokens read per step (the raw loop reads up to 2048 of each prompt in a step: a whole "
        "group of 32 128-token prompts at once, which this default matches)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat-prompts", action="store_true", help="send the same prompts in every load (prompt-cache hits)"
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    global PREFILL_BATCH_SIZE, PREFILL_STEP_SIZE
    PREFILL_BATCH_SIZE, PREFILL_STEP_SIZE = args.prefill_batch_size, args.prefill_step_size
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = build_model(args.shape, workdir)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        runs = args.warmups + args.rounds
        needed = max(counts) * runs if args.repeat_prompts else sum(counts) * runs
        texts = prompts(needed, args.prompt_tokens, None if args.shape == "tiny" else vocab)
        result: dict[str, Any] = {
            "shape": args.shape,
            "repeat_prompts": args.repeat_prompts,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
        }
        raw = RawLoop(path)
        raw.run(texts[: max(counts)], args.new_tokens)  # warm-up: kernels for these shapes
        result["raw_batch_generator"] = raw.run(texts[: max(counts)], args.new_tokens)
        raw.run(texts[:1], args.new_tokens)
        result["raw_batch_generator_1"] = raw.run(texts[:1], args.new_tokens)
        result["engine_direct"] = engine_direct(path, texts[: 2 * max(counts)], args.new_tokens)
        raw.stream(texts[0], args.new_tokens)  # warm-up
        result["stream_generate"] = raw.stream(texts[0], args.new_tokens)
        result["mlxpool"] = serve_and_measure("mlxpool", path, texts, counts, args, workdir, raw)
        if not args.skip_mlx_lm_server:
            result["mlx_lm_server"] = serve_and_measure("mlx_lm.server", path, texts, counts, args, workdir, raw)
    print(json.dumps(result, indent=2))
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def print_table(result: dict[str, Any]) -> None:
    raw = result["raw_batch_generator"]["tokens_per_s"]
    print(f"\nraw BatchGenerator: {raw:.0f} tok/s ({result['raw_batch_generator_1']['tokens_per_s']:.0f} for one "
          "sequence); stream_generate single stream: "
          f"{result['stream_generate']['tokens_per_s']:.1f} tok/s; engine alone "
          f"{result['engine_direct']['tokens_per_s']:.0f} tok/s")  # fmt: skip
    for name in ("mlxpool", "mlx_lm_server"):
        for row in result.get(name, []):
            beside = "the raw loop" if row["clients"] > 1 else "stream_generate"
            ratio = f"  {row['ratio_to_beside']:.2f}x {beside} beside" if "ratio_to_beside" in row else ""
            rate, p50, p99 = (row[k] or float("nan") for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms"))
            print(f"{name:14s} clients {row['clients']:3d}: {rate:8.1f} tok/s  TTFT p50 "
                  f"{p50:.0f} ms p99 {p99:.0f} ms  failed {row['failed']}"
                  + ratio)  # fmt: skip


if __name__ == "__main__":
    main()
