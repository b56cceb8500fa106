"""GET /: the status page is served, and renders the pool in a real browser (headless Chromium, when installed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ServeFactory, make_settings
from tests.fakes import FakeLoader
from tests.test_server import free_ports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: chromium)")
READY_GREEN = (0x30, 0xA4, 0x6C)
"""The page's `ready` badge colour."""


async def test_the_page_is_one_self_contained_html_file(serve: ServeFactory, tmp_path: Path) -> None:
    settings = make_settings({"m": {"kind": "embedding", "path": str(tmp_path)}}, api_keys=["k"])
    async with serve(settings, loader=FakeLoader({})) as s:
        page = await s.http.get("/")  # no key: the page holds no data, its data calls need the key
        data = await s.http.get("/admin/models")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<table id="models">' in page.text and "sessionStorage" in page.text
    assert "src=" not in page.text and '<link rel="stylesheet"' not in page.text  # nothing to fetch or build
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    assert data.status_code == 401


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    command += ["--window-size=1200,800", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(command, capture_output=True, timeout=60, check=True)


@contextlib.contextmanager
def running_server(args: list[str], tmp: Path, key: str | None = None) -> Iterator[str]:
    """`python -m mlxpool serve ARGS` on a free port (with API key `key`); yields its URL once ready."""
    port = free_ports(1)[0]
    env = {**os.environ, "MLXPOOL_CACHE_DIR": str(tmp / "cache"), "MLXPOOL_PORTS": str(port)}
    if key is not None:
        env["MLXPOOL_API_KEYS"] = key
    with (tmp / "server.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mlxpool", "serve", *args], env=env, stderr=log)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        deadline = time.monotonic() + 90
        while not _ready(url, headers):
            assert process.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.kill()
        process.wait()


def _ready(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(["--demo"], tmp_path_factory.mktemp("demo-server")) as url:
        yield url


@needs_chromium
def test_the_page_renders_the_model_table_in_chromium(demo_server: str, tmp_path: Path) -> None:
    embedded = httpx.post(f"{demo_server}/v1/embeddings", json={"model": "demo-embedding", "input": "hi"}, timeout=30)
    assert embedded.status_code == 200
    dom = chromium(f"{demo_server}/", tmp_path / "profile", "--dump-dom").stdout.decode()
    for name in ("demo-embedding", "demo-bert", "demo-chat", "demo-asr", "demo-tts"):
        assert f'<tr data-model="{name}">' in dom
    assert '<span class="state ready">ready</span>' in dom  # demo-embedding is preloaded
    assert "POST /v1/embeddings" in dom and "budget in use" in dom

    shot = tmp_path / "status.png"
    chromium(f"{demo_server}/", tmp_path / "profile", f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.size == (1200, 800)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # The table is drawn: plenty of text, and the green `ready` badges of the preloaded models.
    assert (pixels.max(axis=2) < 80).sum() > 2000
    assert (np.abs(pixels - READY_GREEN).max(axis=2) < 12).sum() > 300


@needs_chromium
def test_with_api_keys_the_page_asks_for_a_key(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.m]\nkind = "embedding"\npath = "{tmp_path}"\n')
    with running_server(["--config", str(config)], tmp_path, key="secret-key") as url:
        dom = chromium(f"{url}/", tmp_path / "profile", "--dump-dom").stdout.decode()
        assert '<form id="login">' in dom and "waiting for an API key" in dom  # shown (not `hidden`)
        assert "data-model=" not in dom
