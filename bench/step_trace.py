"""Run `mlxpool` with a timeline of its worker steps, to see where time goes under a load.

    MLXPOOL_STEP_TRACE=trace.jsonl python bench/step_trace.py serve --config C.toml   # then run a load
    python bench/step_trace.py --summary trace.jsonl

Every worker step is recorded (which item, whether between another's pieces), every chat and embedding engine step
(start, end, and what the batch looked like), and every chat request and embedding request as the event loop sees
it (submitted, first/last result). The file is written when the server exits. `--summary` prints where the
worker's time went per item, and, per burst of chat requests, how long the batch took to fill, the number of decode
steps and their sizes, and, for embeddings, how long requests waited for the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

RECORDS: list[dict[str, Any]] = []


def install(path: str) -> None:
    from mlxpool.engines.chat import ChatEngine
    from mlxpool.engines.embedding import EmbeddingEngine
    from mlxpool.worker import Job, Worker

    clock = time.perf_counter
    chat_step, generate = ChatEngine.step, ChatEngine.generate
    embedding_step, embed = EmbeddingEngine.step, EmbeddingEngine.embed

    phases: dict[str, float] = {}
    sync = bool(os.environ.get("MLXPOOL_STEP_TRACE_SYNC"))
    _time_phases(phases, sync)

    def traced_chat_step(self: ChatEngine) -> None:
        incoming, start, cpu, tokens = len(self._incoming), clock(), time.thread_time(), self.generated_tokens
        phases.clear()
        chat_step(self)
        g = self.generator
        RECORDS.append({
            "e": "chat_step", "t0": start, "t1": clock(), "cpu": time.thread_time() - cpu,
            "threads": threading.active_count(), "incoming": incoming, "active": len(self._active),
            "decode": len(g.running), "prefill": len(g.group.rows), "waiting": len(g.waiting),
            "solo": self._solo is not None,
            "tokens": self.generated_tokens - tokens, "phases": {k: round(1000 * v, 3) for k, v in phases.items()},
        })  # fmt: skip

    async def traced_generate(self: ChatEngine, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        record: dict[str, Any] = {"e": "chat_request", "submit": clock(), "first": None, "tokens": 0}
        RECORDS.append(record)
        async with contextlib.aclosing(generate(self, *args, **kwargs)) as deltas:
            async for delta in deltas:
                record["first"] = record["first"] or clock()
                record["tokens"] += 1
                yield delta
        record["end"] = clock()

    def traced_embedding_step(self: EmbeddingEngine) -> None:
        start, before = clock(), self.sequences
        embedding_step(self)
        RECORDS.append({"e": "embedding_step", "t0": start, "t1": clock(), "rows": self.sequences - before})

    async def traced_embed(self: EmbeddingEngine, sequences: list[list[int]]) -> Any:
        record = {"e": "embedding_request", "submit": clock()}
        RECORDS.append(record)
        try:
            return await embed(self, sequences)
        finally:
            record["end"] = clock()

    worker_step = Worker._step

    def traced_worker_step(self: Worker, item: Any) -> None:
        start, between, hands_over = clock(), self._between, self.hands_over
        worker_step(self, item)
        name = type(item).__name__ if not isinstance(item, Job) else f"Job:{getattr(item.task, '__qualname__', '?')}"
        cuts = hasattr(item, "cut")  # only text models cut their steps (engines/pieces.py)
        RECORDS.append({"e": "item_step", "item": name, "t0": start, "t1": clock(), "between": between,
                        "hands_over": hands_over and cuts and not between})  # fmt: skip

    Worker._step = traced_worker_step  # type: ignore[method-assign]
    ChatEngine.step = traced_chat_step  # type: ignore[method-assign]
    ChatEngine.generate = traced_generate  # type: ignore[method-assign]
    EmbeddingEngine.step = traced_embedding_step  # type: ignore[method-assign]
    EmbeddingEngine.embed = traced_embed  # type: ignore[method-assign]

    def write() -> None:
        with open(path, "w") as f:
            for record in RECORDS:
                f.write(json.dumps(record) + "\n")

    atexit.register(write)
    # uvicorn raises the SIGTERM it caught again once it has shut down: exit normally then, so atexit runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _time_phases(phases: dict[str, float], sync: bool) -> None:
    """Time the parts of a chat step inside the batch (with `sync`, each waits for the GPU)."""
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    from mlxpool.engines.batching import ContinuousBatch
    from mlxpool.engines.chat import ChatEngine

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                if sync:
                    mx.synchronize()
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start
                phases[label + "_cpu"] = phases.get(label + "_cpu", 0.0) + time.thread_time() - cpu

        setattr(owner, name, wrapper)

    timed(GenerationBatch, "next", "decode")
    timed(GenerationBatch, "_step", "forward")
    timed(mx, "async_eval", "async_eval")
    timed(mx, "eval", "eval")
    timed(GenerationBatch, "extend", "join")
    timed(GenerationBatch, "filter", "filter")
    timed(PromptProcessingBatch, "prompt", "prefill")
    timed(PromptProcessingBatch, "generate", "first_token")
    timed(ContinuousBatch, "_merge", "merge")
    timed(ChatEngine, "_admit", "admit")
    timed(ChatEngine, "_count_cache", "count_cache")
    timed(ChatEngine, "_deliver", "deliver")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(path: Path, gap: float = 0.5) -> dict[str, Any]:
    """Chat requests grouped into bursts (a pause of `gap` seconds separates two), and embedding waits."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if r["e"] == "chat_step"]
    requests = sorted((r for r in records if r["e"] == "chat_request" and "end" in r), key=lambda r: r["submit"])
    bursts: list[list[dict[str, Any]]] = []
    for r in requests:
        if bursts and r["submit"] - max(x["end"] for x in bursts[-1]) < gap:
            bursts[-1].append(r)
        else:
            bursts.append([r])
    out: dict[str, Any] = {"worker_items": worker_items(records), "bursts": []}
    for burst in bursts:
        start, end = burst[0]["submit"], max(r["end"] for r in burst)
        inside = [s for s in steps if start <= s["t0"] <= end]
        busy = sum(s["t1"] - s["t0"] for s in inside)
        decode = [s for s in inside if s["decode"] or s["solo"]]
        joins = [s for s in inside if s["prefill"] or s["waiting"]]
        tokens = sum(r["tokens"] for r in burst)
        out["bursts"].append({
            "requests": len(burst),
            "seconds": round(end - start, 4),
            "tokens_per_s": round(tokens / (end - start), 1),
            "arrival_spread_ms": round(1000 * (burst[-1]["submit"] - start), 1),
            "ttft_ms_p50": round(1000 * statistics.median(r["first"] - r["submit"] for r in burst), 1),
            "last_first_token_ms": round(1000 * (max(r["first"] for r in burst) - start), 1),
            "steps": len(inside),
            "worker_busy": round(busy / (end - start), 3),
            "step_ms_p50": round(1000 * _pct([s["t1"] - s["t0"] for s in inside], 0.5), 2),
            "step_ms_p99": round(1000 * _pct([s["t1"] - s["t0"] for s in inside], 0.99), 2),
            "steps_with_prefill": len(joins),
            "prefill_step_ms_total": round(1000 * sum(s["t1"] - s["t0"] for s in joins), 1),
            "decode_batch_sizes": _histogram([s["decode"] or 1 for s in decode]),
        })  # fmt: skip
    chat_busy = [(s["t0"], s["t1"]) for s in steps if s["decode"] > 8]
    for name, busy in (("embeddings_idle", False), ("embeddings_busy", True)):
        timed = timed_embeddings(records, chat_busy, busy)
        if timed:
            out[name] = {"requests": len(timed)} | {
                f"{what}_ms_{q}": round(1000 * _pct([spans[i] for spans, _ in timed], p), 2)
                for i, what in ((1, "wait"), (2, "forward"), (0, "total")) for q, p in (("p50", 0.5), ("p99", 0.99))
            }  # fmt: skip
    out["slowest_embeddings_busy"] = slowest_embeddings(records, chat_busy)
    longest = sorted(steps, key=lambda s: s["t0"] - s["t1"])[:15]
    out["longest_chat_steps"] = [
        {"ms": round(1000 * (s["t1"] - s["t0"]), 2), "cpu_ms": round(1000 * s.get("cpu", 0.0), 2)}
        | {k: s.get(k) for k in ("decode", "prefill", "waiting", "tokens", "threads")}
        | {"phases": s.get("phases")} for s in longest
    ]  # fmt: skip
    long = [s for s in steps if s["t1"] - s["t0"] > 0.04]
    out["chat_steps_over_40ms"] = {
        "count": len(long), "of": len(steps), "wall_ms": round(1000 * sum(s["t1"] - s["t0"] for s in long), 1),
        "cpu_ms": round(1000 * sum(s.get("cpu", 0.0) for s in long), 1),
    }  # fmt: skip
    chat_ms = [1000 * (t1 - t0) for t0, t1 in chat_busy]
    if chat_ms:
        out["chat_step_ms_batch_over_8"] = {"p50": round(_pct(chat_ms, 0.5), 2), "p99": round(_pct(chat_ms, 0.99), 2)}
    return out


def worker_items(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the worker's time went: per item (engine class or job), its steps taken in turn and those taken
    between another's pieces (`+between`); a text model's step that handed over is counted apart (`+handing over`)."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r["e"] != "item_step":
            continue
        key = r["item"] + (" +between" if r["between"] else " +handing over" if r["hands_over"] else "")
        row = out.setdefault(key, {"steps": 0, "seconds": 0.0, "longest": 0.0})
        row["steps"] += 1
        row["seconds"] += r["t1"] - r["t0"]
        row["longest"] = max(row["longest"], r["t1"] - r["t0"])
    return {
        k: {"steps": v["steps"], "seconds": round(v["seconds"], 2),
            "mean_ms": round(1000 * v["seconds"] / v["steps"], 2), "max_ms": round(1000 * v["longest"], 1)}
        for k, v in sorted(out.items())
    }  # fmt: skip


def slowest_embeddings(
    records: list[dict[str, Any]], chat_busy: list[tuple[float, float]], share: float = 0.01
) -> dict[str, Any]:
    """The slowest `share` of the embedding requests made while the chat batch was busy: how their time split
    (waiting for the worker, their forward pass, the event loop handing the result back) and what kind of chat step
    was running when each arrived (`changed`: rows joined or left the batch in it; `steady`: a plain decode step)."""
    steps = sorted((r for r in records if r["e"] == "chat_step"), key=lambda s: s["t0"])
    timed = timed_embeddings(records, chat_busy, busy=True)
    timed.sort(key=lambda t: -t[0][0])
    slowest = timed[: max(1, round(share * len(timed)))] if timed else []
    behind: dict[str, int] = {}
    for _, r in slowest:
        running = next((s for s in steps if s["t0"] <= r["submit"] < s["t1"]), None)
        kind = "none" if running is None else "changed" if _changed(running) else "steady"
        behind[kind] = behind.get(kind, 0) + 1
    mean = {
        f"{what}_ms_mean": round(1000 * statistics.fmean(spans[i] for spans, _ in slowest), 2) if slowest else None
        for i, what in enumerate(("total", "wait", "forward", "deliver"))
    }  # fmt: skip
    return {"requests": len(slowest), "of": len(timed)} | mean | {"arrived_during": behind}


def timed_embeddings(
    records: list[dict[str, Any]], chat_busy: list[tuple[float, float]], busy: bool
) -> list[tuple[list[float], dict[str, Any]]]:
    """The embedding requests made while the chat batch was busy (or, with `busy` false, while it was not), each
    with its seconds [total, waiting for the worker, forward pass, handing the result back] (its own step is taken
    to be the first embedding step to start after it was submitted)."""
    embedding_steps = sorted((s for s in records if s["e"] == "embedding_step"), key=lambda s: s["t0"])
    timed = []
    for r in records:
        if r["e"] != "embedding_request" or "end" not in r or _overlaps(chat_busy, r["submit"], r["end"]) != busy:
            continue
        own = next((s for s in embedding_steps if s["t0"] >= r["submit"]), None)
        if own is not None:
            spans = [r["end"] - r["submit"], own["t0"] - r["submit"], own["t1"] - own["t0"], r["end"] - own["t1"]]
            timed.append((spans, r))
    return timed


def _changed(step: dict[str, Any]) -> bool:
    """A chat step in which rows joined or left the batch (admission, prefill, finished rows filtered out)."""
    return bool(step["prefill"] or step["incoming"] or {"filter", "join", "merge"} & step.get("phases", {}).keys())


def _overlaps(spans: list[tuple[float, float]], start: float, end: float) -> bool:
    return any(t0 < end and t1 > start for t0, t1 in spans)


def _histogram(sizes: list[int]) -> dict[str, int]:
    edges = (1, 2, 4, 8, 16, 32, 48, 64, 128)
    counts: dict[str, int] = {}
    for size in sizes:
        edge = next(e for e in edges if size <= e)
        counts[f"<={edge}"] = counts.get(f"<={edge}", 0) + 1
    return counts


def main() -> None:
    if sys.argv[1:2] == ["--summary"]:
        print(json.dumps(summarize(Path(sys.argv[2])), indent=2))
        return
    install(os.environ["MLXPOOL_STEP_TRACE"])
    if interval := os.environ.get("MLXPOOL_SWITCH_INTERVAL"):  # an experiment: the GIL's switch interval
        sys.setswitchinterval(float(interval))
    from mlxpool.cli import main as mlxpool_main

    sys.exit(mlxpool_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
