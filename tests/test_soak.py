"""Issue 8's budget and leak scenarios, short, on CPU with tiny models: a real server whose models cannot all fit
at once under a mixed load (bench/load.py's soak), then load/unload cycles of every kind (its leaks check)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server import free_ports, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from load import leaks, soak
from soak_scenarios import BUILDERS, LANES, tight_config


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Four tiny models of ~4-6 MiB each (weights + a 4 MiB working reserve) under a 12 MiB budget: two fit."""
    root = tmp_path_factory.mktemp("soak")
    config = root / "soak.toml"
    config.write_text("[server]\n" + tight_config(root))
    port = free_ports(1)[0]
    env = {**os.environ, "MLXPOOL_PORTS": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlxpool", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_mixed_load_that_cannot_fit_stays_within_the_budget(tight_server: str) -> None:
    report = asyncio.run(soak(tight_server, LANES, seconds=30, chat_tokens=16))
    assert report["samples"] > 100 and report["within_budget"], report["peak"]
    assert report["pass"], report["errors"]  # every request succeeded or got 503 with Retry-After
    assert all(kind["ok"] > 0 for kind in report["load"].values()), report["load"]  # every kind took turns


def test_load_unload_cycles_return_memory_to_baseline(tight_server: str) -> None:
    report = asyncio.run(leaks(tight_server, list(BUILDERS), cycles=10))
    assert report["pass"], report
