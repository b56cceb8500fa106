"""The load harness's own logic (bench/load.py): percentiles, summaries, lane parsing and mixing, verdicts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from load import Lane, Record, memory_verdict, parse_lane, percentile, schedule, summarize


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
