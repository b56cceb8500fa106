"""Getting models from a hub: a fake one on loopback (tests/fakehub.py) serving a tiny generated model."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlxpool.cli import main
from mlxpool.errors import RepoNotFoundError
from mlxpool.pool import downloads
from tests.conftest import Served, ServeFactory, make_settings
from tests.fakehub import FakeHub, fast_resume, go_offline, use_fake_hub

REPO = "org/tiny-bert"


@pytest.fixture
def hub(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    files = {f.name: f.read_bytes() for f in tiny_models["bert"].iterdir()}
    files["pytorch_model.bin"] = b"not needed by MLX backends"
    repos = {REPO: files, "org/gated": files, "org/other-bert": files}
    with FakeHub(repos, gated=["org/gated"], token="secret") as fake:
        use_fake_hub(monkeypatch, fake, tmp_path / "hub-cache")
        yield fake


def model(repo: str = REPO, **options: Any) -> dict[str, Any]:
    return {"kind": "embedding", "repo": repo, "memory_reserve": "16MB", **options}


@pytest.fixture
async def served(serve: ServeFactory, hub: FakeHub) -> AsyncIterator[Served]:
    settings = make_settings(
        {
            "tiny": model(),
            "missing": model("org/missing"),
            "gated": model("org/gated"),
            "manual": model("org/manual", download=False),
        },
        failure_cooldown=0,
        progress_interval=0.01,
    )
    async with serve(settings) as s:
        yield s


async def embed(s: Served, name: str) -> Any:
    return await s.http.post("/v1/embeddings", json={"model": name, "input": "hello"})


async def test_first_request_downloads_the_model_then_loads_it(served: Served, hub: FakeHub) -> None:
    response = await embed(served, "tiny")
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 32
    assert hub.file_gets("model.safetensors") == [None]
    assert hub.file_gets("pytorch_model.bin") == []  # only what MLX backends read
    snapshot = downloads.snapshot_dir(served.pool.entries["tiny"].spec)
    assert snapshot is not None and (snapshot / downloads.COMPLETE).exists()


async def test_concurrent_requests_share_one_download(served: Served, hub: FakeHub) -> None:
    responses = await asyncio.gather(*(embed(served, "tiny") for _ in range(8)))
    assert {r.status_code for r in responses} == {200}
    assert hub.file_gets("model.safetensors") == [None]
    assert hub.file_gets("config.json") == [None]


async def test_progress_shows_in_the_admin_api_and_the_log(
    served: Served, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mlxpool")
    import huggingface_hub

    gate = threading.Event()

    def slow(repo: str, filename: str, **kwargs: Any) -> Any:
        if filename == "vocab.txt":  # fetched last: everything before it is counted
            gate.wait(10)
        return huggingface_hub.hf_hub_download(repo, filename, **kwargs)

    monkeypatch.setattr(downloads, "hf_hub_download", slow)
    request = asyncio.create_task(embed(served, "tiny"))
    for _ in range(200):
        status = (await served.http.get("/admin/models")).json()["models"][0]
        if status["download"] and status["download"]["done_bytes"] > 0:
            break
        await asyncio.sleep(0.02)
    assert status["state"] == "downloading"
    progress = status["download"]
    assert 0 < progress["done_bytes"] < progress["total_bytes"]
    assert progress["total_bytes"] == sum(len(v) for k, v in hub.repos[REPO].items() if k != "pytorch_model.bin")
    await asyncio.sleep(0.05)
    gate.set()
    assert (await request).status_code == 200
    assert (await served.http.get("/admin/models")).json()["models"][0]["download"] is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading tiny:")]
    line = re.compile(r"downloading tiny: \d+% [\d.]+/[\d.]+ GB \d+ MB/s eta \S+")
    assert lines and all(line.fullmatch(x) for x in lines)
    assert lines[-1].startswith("downloading tiny: 100%")


async def test_a_dropped_connection_resumes_within_the_file(
    served: Served, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_resume(monkeypatch)  # 1 KiB chunks instead of 10 MiB, no 1 s pause before the retry
    hub.cut_after["model.safetensors"] = 5000
    response = await embed(served, "tiny")
    assert response.status_code == 200, response.text
    assert hub.file_gets("model.safetensors") == [None, "bytes=4096-"]


async def test_an_interrupted_download_keeps_the_files_it_finished(
    served: Served, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_resume(monkeypatch)
    hub.cut_after["model.safetensors"] = 1000
    hub.cut_times["model.safetensors"] = 6  # more than huggingface_hub's own retries
    failed = await embed(served, "tiny")
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "hub_unreachable"
    assert served.pool.entries["tiny"].state == "failed"
    assert downloads.snapshot_dir(served.pool.entries["tiny"].spec) is None  # never loaded half-downloaded
    ok = await embed(served, "tiny")  # cooldown 0: the next request tries again
    assert ok.status_code == 200, ok.text
    assert hub.file_gets("config.json") == [None]  # finished before the failure: not fetched again
    assert len(hub.file_gets("model.safetensors")) == 7


async def test_unknown_repo_is_a_404(served: Served) -> None:
    response = await embed(served, "missing")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "repo_not_found" and "org/missing" in error["message"]


async def test_gated_repo_names_hf_token(served: Served) -> None:
    response = await embed(served, "gated")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "hub_unauthorized" and "HF_TOKEN" in error["message"]


async def test_gated_repo_downloads_with_the_token(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent")
    monkeypatch.setenv("HF_TOKEN", "secret")
    response = await embed(served, "gated")
    assert response.status_code == 200, response.text


async def test_not_enough_disk_fails_before_fetching(
    served: Served, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 10_000})())
    response = await embed(served, "tiny")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "disk_full" and "free" in error["message"]
    assert hub.file_gets("model.safetensors") == []


async def test_a_model_with_download_off_says_how_to_fetch_it(served: Served) -> None:
    response = await embed(served, "manual")
    assert response.status_code == 503
    assert "mlxpool download manual" in response.json()["error"]["message"]


async def test_offline_mode_uses_the_warm_cache(
    serve: ServeFactory, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings({"tiny": model()})
    async with serve(settings) as s:
        assert (await embed(s, "tiny")).status_code == 200
    seen = len(hub.requests)
    go_offline(monkeypatch)
    async with serve(settings) as s:
        assert (await embed(s, "tiny")).status_code == 200
    assert len(hub.requests) == seen


def test_cli_download_prints_the_plan_then_fetches_and_skips_what_is_there(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[models.tiny]\nkind = "embedding"\nrepo = "{REPO}"\n[models.other]\nkind = "asr"\nrepo = "org/missing"\n'
    )
    assert main(["download", "tiny", "--dry-run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and REPO in out and "to fetch:" in out
    assert hub.file_gets("model.safetensors") == []

    assert main(["download", "tiny", "--config", str(config)]) == 0
    assert "downloaded: tiny" in capsys.readouterr().out
    assert hub.file_gets("model.safetensors") == [None]

    assert main(["download", "tiny", "--config", str(config)]) == 0
    assert "to fetch: 0 B" in capsys.readouterr().out
    assert hub.file_gets("model.safetensors") == [None]

    assert main(["download", "--all", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "org/missing" in captured.err and "not found" in captured.err


def test_cli_models_lists_disk_state_estimate_and_fit(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[server]\nmemory_budget = "1GB"\n'
        f'[models.tiny]\nkind = "embedding"\nrepo = "{REPO}"\nmemory_reserve = "1MB"\n'
        f'[models.huge]\nkind = "embedding"\nrepo = "{REPO}"\nmemory_reserve = "2GB"\n'
    )
    assert main(["models", "--config", str(config)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:3]}
    assert rows["tiny"][3:] == ["no", "1.1", "MiB", "yes"]  # weights read remotely from the safetensors header
    assert rows["huge"][-1] == "no"
    assert main(["download", "tiny", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["models", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "yes"


def test_download_script_is_the_cli(hub: FakeHub, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.tiny]\nkind = "embedding"\nrepo = "{REPO}"\n')
    script = Path(__file__).parents[2] / "scripts" / "download_models.py"
    result = subprocess.run(
        [sys.executable, str(script), "--all", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "downloaded: tiny" in result.stdout and hub.file_gets("model.safetensors") == [None]


def test_weights_are_read_from_safetensors_headers(tiny_models: dict[str, Path]) -> None:
    import mlx.core as mx

    from mlxpool.pool.sources import weights_bytes

    arrays = mx.load(str(tiny_models["bert"] / "model.safetensors"))
    assert isinstance(arrays, dict)
    assert weights_bytes(tiny_models["bert"]) == sum(int(a.nbytes) for a in arrays.values())


async def test_waiting_streams_get_status_lines_until_the_model_is_ready(
    served: Served, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def slow(repo: str, filename: str, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return huggingface_hub.hf_hub_download(repo, filename, **kwargs)

    monkeypatch.setattr(downloads, "hf_hub_download", slow)
    lines = [line async for line in served.pool.wait_ready("tiny", interval=0.02)]
    assert any(re.fullmatch(r"downloading tiny: \d+% .* eta \S+", line) for line in lines), lines
    assert served.pool.entries["tiny"].state == "ready"
    with pytest.raises(RepoNotFoundError):
        async for _ in served.pool.wait_ready("missing", interval=0.02):
            pass


@pytest.mark.parametrize("allowed", [False, True])
async def test_a_request_names_an_unconfigured_repo_only_with_allow_any_model(
    serve: ServeFactory, hub: FakeHub, allowed: bool
) -> None:
    settings = make_settings({"configured": model()}, allow_any_model=allowed)
    async with serve(settings) as s:
        response = await s.http.post("/v1/embeddings", json={"model": "org/gated", "input": "hi"})
        assert response.status_code == (503 if allowed else 404), response.text  # gated: the hub refuses us
        response = await s.http.post("/v1/embeddings", json={"model": REPO + "-unlisted", "input": "hi"})
        assert response.status_code == 404  # allowed: the hub has no such repo (repo_not_found); else not served
        response = await s.http.post("/v1/embeddings", json={"model": "org/other-bert", "input": "hi"})
        assert response.status_code == (200 if allowed else 404), response.text  # downloaded and served
        if allowed:
            assert s.pool.entries["org/other-bert"].spec.kind == "embedding"
            ask = {"model": "org/other-bert", "messages": [{"role": "user", "content": "hi"}]}
            wrong = await s.http.post("/v1/chat/completions", json=ask)
            assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_not_supported"
        for bad in ("../etc", "/abs/path", "org/..", "a/b/c"):
            refused = await s.http.post("/v1/embeddings", json={"model": bad, "input": "hi"})
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found", bad
        fetched = await s.http.post("/v1/embeddings", json={"model": REPO, "input": "hi"})  # configured by repo id
        assert fetched.status_code == 200
        assert ("org/gated" in s.pool.entries) is allowed
