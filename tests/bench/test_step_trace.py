"""The step timeline's summary (bench/step_trace.py): where the worker's time went, and what the slowest embeddings
under a chat load waited for."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from step_trace import slowest_embeddings, worker_items


def chat_step(t0: float, t1: float, **changes: Any) -> dict[str, Any]:
    step = {"e": "chat_step", "t0": t0, "t1": t1, "decode": 64, "prefill": 0, "incoming": 0, "phases": {}}
    return step | changes


def embedding(submit: float, start: float, done: float, end: float) -> list[dict[str, Any]]:
    return [
        {"e": "embedding_request", "submit": submit, "end": end},
        {"e": "embedding_step", "t0": start, "t1": done, "rows": 8},
    ]


def test_the_slowest_share_is_split_into_wait_forward_and_delivery() -> None:
    records = [
        chat_step(0.0, 0.010),
        chat_step(0.010, 0.050, phases={"filter": 2.0}),  # rows left the batch
        *embedding(0.001, 0.011, 0.020, 0.021),  # 20 ms, arrived in a steady step
        *embedding(0.012, 0.050, 0.060, 0.070),  # 58 ms, arrived in a changed one
        *embedding(0.100, 0.100, 0.101, 0.102),  # no chat step running: not under load, left out
    ]
    busy = [(0.0, 0.010), (0.010, 0.050)]
    slowest = slowest_embeddings(records, busy, share=0.5)
    assert slowest["requests"] == 1 and slowest["of"] == 2
    assert slowest["arrived_during"] == {"changed": 1}
    assert (slowest["total_ms_mean"], slowest["wait_ms_mean"]) == (58.0, 38.0)
    assert (slowest["forward_ms_mean"], slowest["deliver_ms_mean"]) == (10.0, 10.0)
    both = slowest_embeddings(records, busy, share=1.0)
    assert both["arrived_during"] == {"changed": 1, "steady": 1}
    assert both["wait_ms_mean"] == 24.0  # (10 + 38) / 2


def test_an_admission_counts_as_a_change() -> None:
    records = [chat_step(0.0, 0.03, prefill=8), *embedding(0.001, 0.03, 0.04, 0.041)]
    assert slowest_embeddings(records, [(0.0, 0.03)])["arrived_during"] == {"changed": 1}


def test_no_embeddings_under_load() -> None:
    assert slowest_embeddings([chat_step(0.0, 0.01)], [(0.0, 0.01)]) == {
        "requests": 0, "of": 0, "total_ms_mean": None, "wait_ms_mean": None, "forward_ms_mean": None,
        "deliver_ms_mean": None, "arrived_during": {},
    }  # fmt: skip


def item_step(item: str, t0: float, t1: float, between: bool = False, hands_over: bool = False) -> dict[str, Any]:
    return {"e": "item_step", "item": item, "t0": t0, "t1": t1, "between": between, "hands_over": hands_over}


def test_the_worker_time_is_split_by_item_and_by_where_it_stepped() -> None:
    records = [
        item_step("ChatEngine", 0.0, 0.010),
        item_step("EmbeddingEngine", 0.002, 0.006, between=True),  # inside the chat step that handed over
        item_step("ChatEngine", 0.010, 0.040, hands_over=True),
        item_step("AsrEngine", 0.040, 0.340),
        item_step("AsrEngine", 0.340, 0.540),
        chat_step(0.0, 0.010),  # other records are left out
    ]
    assert worker_items(records) == {
        "AsrEngine": {"steps": 2, "seconds": 0.5, "mean_ms": 250.0, "max_ms": 300.0},
        "ChatEngine": {"steps": 1, "seconds": 0.01, "mean_ms": 10.0, "max_ms": 10.0},
        "ChatEngine +handing over": {"steps": 1, "seconds": 0.03, "mean_ms": 30.0, "max_ms": 30.0},
        "EmbeddingEngine +between": {"steps": 1, "seconds": 0.0, "mean_ms": 4.0, "max_ms": 4.0},
    }
