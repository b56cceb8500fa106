"""The load harness's own logic (bench/load.py): percentiles, summaries, lanes and mixing, verdicts, thread CPU."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import load
from load import Lane, Record, arrivals_during, memory_verdict, parse_lane, percentile, schedule, summarize


@contextlib.asynccontextmanager
async def serving(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    """A fake server on a free loopback port; yields its URL."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0 and percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_summary_per_kind_with_errors_by_kind() -> None:
    records = [
        Record("chat", 0, 1.0, tokens=10, first_token=0.1),
        Record("chat", 0, 3.0, tokens=30, first_token=0.3),
        Record("chat", 0, 0.5, error="503", retry_after=True),
        Record("asr", 0, 2.0),
        Record("asr", 0, 0.1, error="ServerDisconnectedError"),
    ]
    summary = summarize(records, seconds=10)
    chat, asr = summary["chat"], summary["asr"]
    assert (chat["requests"], chat["ok"], chat["errors"]) == (3, 2, {"503": 1})
    assert chat["errors_without_retry_after"] == 0 and asr["errors_without_retry_after"] == 1
    assert chat["latency_ms"]["p50"] == pytest.approx(2000) and chat["tokens_per_s"] == 4.0
    assert chat["first_token_ms"]["p50"] == pytest.approx(200) and asr["first_token_ms"] is None
    assert asr["requests_per_s"] == pytest.approx(0.1)


def test_arrivals_during_counts_load_sent_while_the_slowest_were_in_flight() -> None:
    # 100 embeddings of 10 ms, one every 100 ms; the slowest (500 ms, at t=5.0) overlaps a wave of chat requests.
    measured = [Record("embeddings", i / 10, 0.5 if i == 50 else 0.01) for i in range(100)]
    load_ = [Record("chat", 5.22 + i / 10000, 1.0) for i in range(64)]  # sent 220 ms into the slow one
    load_.append(Record("chat", 2.295, 1.0))  # 15 ms before the one sent at 2.3 s: counted (within `before`)
    load_.append(Record("chat", 7.05, 1.0))  # between two embeddings: counted for none
    measured.append(Record("embeddings", 9.0, 9.9, error="503"))  # failed: not counted at all
    tail = arrivals_during(measured, load_, share=0.01, before=0.02)
    assert tail == {
        "slowest": 1,
        "slowest_with_arrivals": 1,
        "all_with_arrivals": 0.02,
        "slowest_mean_arrivals": 64.0,
        "all_mean_arrivals": 0.65,  # (64 + 1) / 100
    }


def test_lanes_parse_and_interleave() -> None:
    assert parse_lane("chat:64:demo-chat") == Lane("chat", 64, "demo-chat")
    assert parse_lane("asr:1:org/whisper:large") == Lane("asr", 1, "org/whisper:large")
    for bad in ("video:1:m", "chat:0:m", "chat:2:"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lane(bad)
    mixed = schedule([Lane("chat", 3, "c"), Lane("asr", 1, "a"), Lane("tts", 2, "t")])
    assert mixed == [("chat", "c"), ("asr", "a"), ("tts", "t"), ("chat", "c"), ("tts", "t"), ("chat", "c")]


def test_memory_verdict_counts_samples_over_the_budget_above_baseline() -> None:
    def sample(active: int) -> dict[str, int]:
        return {"active_memory_bytes": active, "baseline_memory_bytes": 100, "budget_bytes": 1000}

    assert memory_verdict([sample(500), sample(1100)])["within_budget"]  # 1100 - 100 baseline = 1000: at the limit
    verdict = memory_verdict([sample(500), sample(1101), sample(900)])
    assert not verdict["within_budget"] and verdict["samples_over_budget"] == 1
    assert verdict["peak"]["active_memory_bytes"] == 1101


async def test_a_load_from_its_own_process_runs_around_the_requests_measured_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(3):
            await asyncio.sleep(0.01)
            await response.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    monkeypatch.setattr(load, "LEAD", 3.0)  # the child's start-up on a slow machine
    routes = [web.post("/v1/embeddings", embeddings), web.post("/v1/chat/completions", chat)]
    async with serving(routes) as url:
        started = time.perf_counter()
        chats, probes = await load.beside(url, [Lane("chat", 2, "c")], [Lane("embeddings", 1, "e")], 1.0)
    assert chats and {(r.kind, r.error) for r in chats} == {("chat", None)}
    assert probes and {(r.kind, r.error) for r in probes} == {("embeddings", None)}
    assert min(r.started for r in probes) >= started + 3.0
    # perf_counter is one clock for both processes (CLOCK_MONOTONIC): the load covers the measured second.
    assert min(r.started for r in chats) < min(r.started for r in probes)
    assert max(r.started + r.seconds for r in chats) > max(r.started for r in probes)


async def test_a_paced_lane_waits_between_its_requests() -> None:
    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async with serving([web.post("/v1/embeddings", embeddings)]) as url:
        paced = await load.run_lanes(url, [Lane("embeddings", 1, "e", pause=0.1)], 0.5)
        free = await load.run_lanes(url, [Lane("embeddings", 1, "e")], 0.5)
    starts = [r.started for r in paced]
    assert 3 <= len(starts) <= 6 and all(b - a >= 0.1 for a, b in itertools.pairwise(starts))
    assert len(free) > 2 * len(paced)


async def test_leaks_takes_its_baseline_once_memory_has_settled() -> None:
    """A fake server whose first cycle leaves 2 MB held a while (freed by the second), then leaks 3 KB per unload:
    a baseline taken after one cycle would hide the leak under the freed 2 MB."""
    unloads = 0

    def active() -> int:
        return 200_000 + (2_000_000 if unloads <= 2 else 0) + 3_000 * max(0, unloads - 4)

    async def admin(request: web.Request) -> web.Response:
        nonlocal unloads
        unloads += request.match_info["verb"] == "unload"
        return web.json_response({})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"active_memory_bytes": active(), "rss_bytes": 10**8, "used_bytes": 0})

    async with serving([web.post("/admin/models/{model}/{verb}", admin), web.get("/admin/models", status)]) as url:
        report = await load.leaks(url, ["a", "b"], cycles=10)
    assert report["before"]["active_memory_bytes"] == 200_000  # after the second warm-up cycle, not the first
    assert report["after"]["active_memory_bytes"] == 200_000 + 3_000 * (6 + 20 - 4)  # 3 warm-up cycles, 10 measured
    assert not report["pass"]


def test_a_busy_thread_gains_cpu_time_and_an_idle_one_does_not() -> None:
    pid, me = os.getpid(), threading.get_native_id()
    idle = threading.Event()
    sleeper = threading.Thread(target=idle.wait)
    sleeper.start()
    try:
        assert sleeper.native_id is not None
        mine, theirs = load.thread_cpu_seconds(pid, me), load.thread_cpu_seconds(pid, sleeper.native_id)
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:  # 0.3 s of this thread's CPU
            pass
        assert load.thread_cpu_seconds(pid, me) - mine >= 0.2  # clock ticks: 10 ms steps
        assert load.thread_cpu_seconds(pid, sleeper.native_id) - theirs <= 0.02
    finally:
        idle.set()
        sleeper.join()
