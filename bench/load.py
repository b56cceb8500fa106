"""Mixed load against a running mlxpool: lanes of chat streams, embeddings, transcriptions and speech, with
per-kind latency percentiles, throughput and errors by kind, and the pool scenarios built on them.

    python bench/load.py mix --url URL --seconds 60 --lane chat:64:MODEL --lane embeddings:1:MODEL
    python bench/load.py fairness --url URL --chat-model M --embedding-model E [--streams 64]
    python bench/load.py cold-load --url URL --chat-model M --cold-model C [--streams 16]
    python bench/load.py soak --url URL --seconds 600 --lane chat:4:M --lane asr:1:A ...   (memory every 100 ms)
    python bench/load.py leaks --url URL --model A --model B [--cycles 100]
    python bench/load.py connections --url URL --chat-model M [--clients 256]

A lane is KIND:WORKERS:MODEL; each worker sends requests of that kind back to back until the time is up. Kinds:
chat (a streamed completion of --chat-tokens), embeddings (8 short texts), asr (2 s of audio), tts (a sentence).
Every scenario prints a JSON report with its verdict; `--out FILE` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import io
import json
import math
import multiprocessing
import os
import statistics
import time
import wave
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import output

KINDS = ("chat", "embeddings", "asr", "tts")
COMPLETIONS = False
"""Send chat load to /v1/completions with a plain prompt (`--completions`), for models without a chat template."""


@dataclass(frozen=True)
class Lane:
    kind: str
    workers: int
    model: str
    pause: float = 0.0
    """Seconds each worker waits after a reply before its next request (0: back to back)."""


@dataclass(frozen=True)
class Record:
    kind: str
    started: float
    seconds: float
    error: str | None = None
    """None: success; else the HTTP status ("503") or the exception's class name."""
    retry_after: bool = False
    tokens: int = 0
    first_token: float | None = None


def parse_lane(text: str) -> Lane:
    """`chat:64:demo-chat` -> Lane("chat", 64, "demo-chat")."""
    kind, workers, model = text.split(":", 2)
    if kind not in KINDS or int(workers) < 1 or not model:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:WORKERS:MODEL with KIND one of {KINDS}")
    return Lane(kind, int(workers), model)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    """Per kind: requests, successes, latency percentiles (ms, successes only), rates, errors by kind."""
    report: dict[str, Any] = {}
    for kind in sorted({r.kind for r in records}):
        mine = [r for r in records if r.kind == kind]
        ok = [r for r in mine if r.error is None]
        latencies = [1000 * r.seconds for r in ok]
        firsts = [1000 * r.first_token for r in ok if r.first_token is not None]
        report[kind] = {
            "requests": len(mine),
            "ok": len(ok),
            "errors": dict(Counter(r.error for r in mine if r.error is not None)),
            "errors_without_retry_after": sum(r.error is not None and not r.retry_after for r in mine),
            "latency_ms": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)},
            "first_token_ms": {f"p{q}": percentile(firsts, q) for q in (50, 99)} if firsts else None,
            "requests_per_s": len(ok) / seconds if seconds else None,
            "tokens_per_s": sum(r.tokens for r in ok) / seconds if seconds else None,
        }
    return report


def schedule(lanes: Sequence[Lane]) -> list[tuple[str, str]]:
    """One (kind, model) per worker, lanes interleaved, so that starting them in order mixes the kinds."""
    slots = [[(lane.kind, lane.model)] * lane.workers for lane in lanes]
    mixed = []
    for i in range(max((len(s) for s in slots), default=0)):
        mixed += [s[i] for s in slots if i < len(s)]
    return mixed


def wav_tone(seconds: float = 2.0, rate: int = 16000) -> bytes:
    """A 440 Hz tone as a 16-bit wav file (for transcription load; its text does not matter)."""
    t = [math.sin(2 * math.pi * 440 * i / rate) for i in range(int(seconds * rate))]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(int(12000 * v).to_bytes(2, "little", signed=True) for v in t))
    return buffer.getvalue()


class Client:
    """One request of each kind, timed and classified."""

    def __init__(self, session: aiohttp.ClientSession, chat_tokens: int = 64):
        self.session = session
        self.chat_tokens = chat_tokens
        self.audio = wav_tone()

    async def request(self, kind: str, model: str) -> Record:
        started = time.perf_counter()
        try:
            tokens, first = await getattr(self, kind)(model, started)
        except HttpError as exc:
            return Record(kind, started, time.perf_counter() - started, str(exc.status), exc.retry_after)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Record(kind, started, time.perf_counter() - started, type(exc).__name__)
        return Record(kind, started, time.perf_counter() - started, None, False, tokens, first)

    async def chat(self, model: str, started: float) -> tuple[int, float | None]:
        body: dict[str, Any] = {"model": model, "stream": True, "max_tokens": self.chat_tokens, "temperature": 0.7,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if COMPLETIONS:  # models without a chat template (random-weight benchmark models)
            body["prompt"] = " ".join(f"w{i}" for i in range(1, 64))
        else:
            body["messages"] = [{"role": "user", "content": "Tell me a story."}]
        route = "/v1/completions" if COMPLETIONS else "/v1/chat/completions"
        first, usage = None, 0
        async with self.session.post(route, json=body) as response:
            await _raise_for(response)
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # after the 200: the status the error would have had is in its code
                    code = chunk["error"].get("code") or "error"
                    raise HttpError(f"stream:{code}", code in UNAVAILABLE)
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if first is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                    first = time.perf_counter() - started
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
        return usage, first

    async def embeddings(self, model: str, started: float) -> tuple[int, float | None]:
        body = {"model": model, "input": [f"sentence number {i} about the sea" for i in range(8)]}
        async with self.session.post("/v1/embeddings", json=body) as response:
            await _raise_for(response)
            await response.read()
        return 0, None

    async def asr(self, model: str, started: float) -> tuple[int, float | None]:
        form = aiohttp.FormData({"model": model, "temperature": "0"})
        form.add_field("file", self.audio, filename="tone.wav", content_type="audio/wav")
        async with self.session.post("/v1/audio/transcriptions", data=form) as response:
            await _raise_for(response)
            await response.read()
        return 0, None

    async def tts(self, model: str, started: float) -> tuple[int, float | None]:
        body = {"model": model, "input": "Hello there, how are you today?", "response_format": "wav"}
        async with self.session.post("/v1/audio/speech", json=body) as response:
            await _raise_for(response)
            await response.read()
        return 0, None


UNAVAILABLE = {"service_unavailable", "memory_budget_exceeded", "model_load_failed", "model_too_large",
               "hub_unreachable", "hub_unauthorized", "disk_full", "model_not_downloaded"}  # fmt: skip
"""mlxpool's 503 codes: in a stream that has started they arrive as an error event instead of a 503 + Retry-After."""


class HttpError(Exception):
    def __init__(self, status: int | str, retry_after: bool):
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        await response.read()
        raise HttpError(response.status, "Retry-After" in response.headers)


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU time of one thread, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session(url: str, connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections)
    return aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=1800))


async def run_lanes(url: str, lanes: Sequence[Lane], seconds: float, chat_tokens: int = 64) -> list[Record]:
    """Every lane's workers sending for `seconds`, each waiting its lane's pause between requests."""
    workers = schedule(lanes)
    pauses = {(lane.kind, lane.model): lane.pause for lane in lanes}
    async with session(url, max(len(workers), 1)) as http:
        client = Client(http, chat_tokens)
        deadline = time.perf_counter() + seconds
        records: list[Record] = []

        async def worker(kind: str, model: str) -> None:
            while time.perf_counter() < deadline:
                records.append(await client.request(kind, model))
                if pauses[kind, model]:
                    await asyncio.sleep(pauses[kind, model])

        await asyncio.gather(*(worker(kind, model) for kind, model in workers))
    return records


async def sample_memory(url: str, every: float, stop: asyncio.Event) -> list[dict[str, Any]]:
    """`GET /admin/models` every `every` seconds until `stop`: the pool's and MLX's memory figures."""
    samples = []
    async with session(url, 1) as http:
        while not stop.is_set():
            async with http.get("/admin/models") as response:
                status = await response.json()
            samples.append({k: status.get(k) for k in ("budget_bytes", "used_bytes", "active_memory_bytes",
                                                         "baseline_memory_bytes", "rss_bytes")})  # fmt: skip
            samples[-1]["at"] = time.perf_counter()
            await asyncio.sleep(every)
    return samples


# --- scenarios ------------------------------------------------------------------------------------------------


async def fairness(
    url: str, chat_model: str, embedding_model: str, streams: int, seconds: float, pause: float = 0.0
) -> dict[str, Any]:
    """Embedding p99 latency while `streams` chat streams decode, against its idle p99 (target: <= 3x); the probe
    sends one embedding at a time, `pause` seconds apart (0: back to back, as many as the server answers). The busy
    load runs once unmeasured first: GPU backends compile kernels for each new batch shape, seconds each. The chat
    streams come from a process of their own, so that reading their events does not delay the embeddings measured
    here (one Python client reading 64 streams spent 20-30 ms of the embeddings' p99 doing so)."""
    chat = [Lane("chat", streams, chat_model)]
    probe = [Lane("embeddings", 1, embedding_model, pause)]
    await beside(url, chat, probe, seconds)
    idle = summarize(await run_lanes(url, probe, seconds), seconds)
    chat_records, probe_records = await beside(url, chat, probe, seconds)
    busy = summarize(chat_records, seconds + LEAD) | summarize(probe_records, seconds)
    ratio = _ratio(busy["embeddings"]["latency_ms"]["p99"], idle["embeddings"]["latency_ms"]["p99"])
    tail = arrivals_during(probe_records, chat_records)
    return {"idle": idle, "busy": busy, "p99_ratio": ratio, "pass": ratio is not None and ratio <= 3, "tail": tail}


def arrivals_during(
    measured: Sequence[Record], load: Sequence[Record], share: float = 0.01, before: float = 0.02
) -> dict[str, Any]:
    """How many load requests were sent while each measured request was in flight (or `before` seconds ahead of
    it), for the slowest `share` of the measured requests against all of them: whether the tail comes with the
    load's arrivals (a wave of new chat requests is work for the server's event loop before any token). Clocks:
    time.perf_counter, one per machine."""
    ok = sorted((r for r in measured if r.error is None), key=lambda r: r.seconds)
    starts = sorted(r.started for r in load)

    def arrivals(r: Record) -> int:
        return bisect.bisect_right(starts, r.started + r.seconds) - bisect.bisect_left(starts, r.started - before)

    slowest = ok[len(ok) - max(1, round(share * len(ok))) :] if ok else []
    return {
        "slowest": len(slowest),
        "slowest_with_arrivals": sum(arrivals(r) > 0 for r in slowest),
        "all_with_arrivals": round(sum(arrivals(r) > 0 for r in ok) / len(ok), 3) if ok else None,
        "slowest_mean_arrivals": round(statistics.fmean(arrivals(r) for r in slowest), 2) if slowest else None,
        "all_mean_arrivals": round(statistics.fmean(arrivals(r) for r in ok), 2) if ok else None,
    }


LEAD = 2.0
"""Seconds the load in its own process runs before the requests measured beside it start (its start-up, and its
streams filling the batch)."""


async def beside(
    url: str, load: Sequence[Lane], measured: Sequence[Lane], seconds: float, chat_tokens: int = 128
) -> tuple[list[Record], list[Record]]:
    """`load` from a process of its own for LEAD + `seconds`, and `measured` from this one for the last `seconds`."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        background = loop.run_in_executor(
            pool, run_lanes_in_process, url, list(load), seconds + LEAD, chat_tokens, COMPLETIONS
        )
        await asyncio.sleep(LEAD)
        records = await run_lanes(url, measured, seconds)
        return await background, records


def run_lanes_in_process(
    url: str, lanes: list[Lane], seconds: float, chat_tokens: int, completions: bool
) -> list[Record]:
    global COMPLETIONS
    COMPLETIONS = completions
    return asyncio.run(run_lanes(url, lanes, seconds, chat_tokens))


async def cold_load(url: str, chat_model: str, cold_model: str, streams: int, seconds: float) -> dict[str, Any]:
    """Chat throughput while `cold_model` loads, against without (target: >= 80%)."""
    async with session(url, 1) as http:
        await _admin(http, "load", chat_model)
        await _admin(http, "unload", cold_model)
    alone = summarize(await run_lanes(url, [Lane("chat", streams, chat_model)], seconds), seconds)
    load_seconds: list[float] = []

    async def load_during() -> None:
        async with session(url, 1) as http:
            await asyncio.sleep(seconds / 4)
            start = time.perf_counter()
            await _admin(http, "load", cold_model)
            load_seconds.append(time.perf_counter() - start)

    lanes = run_lanes(url, [Lane("chat", streams, chat_model)], seconds)
    records, _ = await asyncio.gather(lanes, load_during())
    during = summarize(records, seconds)
    ratio = _ratio(during["chat"]["tokens_per_s"], alone["chat"]["tokens_per_s"])
    return {"alone": alone, "during_load": during, "load_seconds": load_seconds, "throughput_ratio": ratio,
            "pass": ratio is not None and ratio >= 0.8}  # fmt: skip


async def soak(url: str, lanes: Sequence[Lane], seconds: float, chat_tokens: int = 32) -> dict[str, Any]:
    """A mixed load whose models cannot all fit: memory sampled every 100 ms stays within the budget, and every
    request succeeds or gets 503 with Retry-After."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(url, 0.1, stop))
    records = await run_lanes(url, lanes, seconds, chat_tokens)
    stop.set()
    samples = await sampler
    report = memory_verdict(samples)
    summary = summarize(records, seconds)
    clean = all(s["errors_without_retry_after"] == 0 for s in summary.values())
    errors = {k: s["errors"] for k, s in summary.items() if s["errors"]}
    return {**report, "load": summary, "errors": errors, "pass": report["within_budget"] and clean}


def memory_verdict(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether MLX's active memory stayed within the budget (above the server's baseline) in every sample."""
    over = [s for s in samples if s["active_memory_bytes"] - (s["baseline_memory_bytes"] or 0) > s["budget_bytes"]]
    peak = max(samples, key=lambda s: s["active_memory_bytes"]) if samples else None
    return {"samples": len(samples), "peak": peak, "samples_over_budget": len(over), "within_budget": not over}


async def leaks(url: str, models: Sequence[str], cycles: int) -> dict[str, Any]:
    """`cycles` load/unload cycles of each model: active memory and RSS come back to their baseline (5%), taken
    after warm-up cycles (`_settled_status`)."""
    async with session(url, 1) as http:
        before = await _settled_status(http, models)
        for _ in range(cycles):
            await _cycle(http, models)
        after = await _status(http)
    growth = {key: _growth(before[key], after[key]) for key in ("active_memory_bytes", "rss_bytes")}
    passed = all(g is None or g <= 0.05 for g in growth.values())
    return {"cycles": cycles, "models": list(models), "before": before, "after": after, "growth": growth,
            "pass": passed}  # fmt: skip


async def connections(url: str, chat_model: str, clients: int, chat_tokens: int = 32) -> dict[str, Any]:
    """`clients` concurrent streaming chat requests, each once: zero connection errors."""
    async with session(url, clients) as http:
        client = Client(http, chat_tokens)
        start = time.perf_counter()
        records = await asyncio.gather(*(client.request("chat", chat_model) for _ in range(clients)))
        seconds = time.perf_counter() - start
    summary = summarize(records, seconds)
    errors = summary["chat"]["errors"]
    return {"clients": clients, "summary": summary, "pass": not errors}


async def _settled_status(http: aiohttp.ClientSession, models: Sequence[str], most: int = 3) -> dict[str, Any]:
    """The status after warm-up cycles (first loads import code and fill allocator pools for good), repeated while
    active memory still falls, at most `most`: memory that an earlier load's last requests held for a while would
    otherwise raise the baseline, and the check with it (after a soak: 2.1 MB against 0.24 settled)."""
    await _cycle(http, models)
    lowest = await _status(http)
    for _ in range(most - 1):
        await _cycle(http, models)
        status = await _status(http)
        if status["active_memory_bytes"] >= lowest["active_memory_bytes"]:
            break
        lowest = status
    return lowest


async def _cycle(http: aiohttp.ClientSession, models: Sequence[str]) -> None:
    for model in models:
        await _admin(http, "load", model)
        await _admin(http, "unload", model)


async def _admin(http: aiohttp.ClientSession, verb: str, model: str) -> None:
    async with http.post(f"/admin/models/{model}/{verb}") as response:
        await _raise_for(response)
        await response.read()


async def _status(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/admin/models") as response:
        status: dict[str, Any] = await response.json()
    return {k: status.get(k) for k in ("active_memory_bytes", "rss_bytes", "used_bytes")}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _growth(before: int | None, after: int | None) -> float | None:
    return (after - before) / before if before and after is not None else None


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    global COMPLETIONS
    COMPLETIONS = args.completions
    scenario: Callable[[], Coroutine[Any, Any, dict[str, Any]]] = {
        "mix": lambda: _mix(args),
        "fairness": lambda: fairness(args.url, args.chat_model, args.embedding_model, args.streams, args.seconds),
        "cold-load": lambda: cold_load(args.url, args.chat_model, args.cold_model, args.streams, args.seconds),
        "soak": lambda: soak(args.url, args.lane, args.seconds),
        "leaks": lambda: leaks(args.url, args.model, args.cycles),
        "connections": lambda: connections(args.url, args.chat_model, args.clients),
    }[args.scenario]
    output.report({"scenario": args.scenario, **asyncio.run(scenario())}, args.out)


async def _mix(args: argparse.Namespace) -> dict[str, Any]:
    records = await run_lanes(args.url, args.lane, args.seconds, args.chat_tokens)
    return {"lanes": [asdict(lane) for lane in args.lane], "summary": summarize(records, args.seconds)}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("scenario", choices=["mix", "fairness", "cold-load", "soak", "leaks", "connections"])
    top.add_argument("--url", default="http://127.0.0.1:8787")
    top.add_argument("--seconds", type=float, default=30)
    top.add_argument("--lane", type=parse_lane, action="append", default=[], help="KIND:WORKERS:MODEL")
    top.add_argument("--chat-model")
    top.add_argument("--embedding-model")
    top.add_argument("--cold-model")
    top.add_argument("--model", action="append", default=[], help="leaks: a model to cycle (repeat)")
    top.add_argument("--streams", type=int, default=64)
    top.add_argument("--clients", type=int, default=256)
    top.add_argument("--cycles", type=int, default=100)
    top.add_argument("--chat-tokens", type=int, default=64)
    top.add_argument("--completions", action="store_true", help="chat load through /v1/completions")
    top.add_argument("--out", type=Path)
    return top


if __name__ == "__main__":
    main()
