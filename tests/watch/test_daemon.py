"""The daemon in-process against a fake server: what it writes, and a kill at every file-system step."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxpool.watch.client import ServerAuthError
from mlxpool.watch.daemon import Daemon, WatchSettings
from mlxpool.watch.pipeline import Options
from tests.watch.fakeserver import TEXT, FakeServer, error

OPTIONS = Options(chunk_chars=30)  # TEXT is corrected in 3 pieces
STEPS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir")
"""The os calls through which the daemon changes the file system (pathlib's too)."""


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync guards against power cuts, not kills: without it these tests run several times faster."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, nothing runs after it."""


def run_once(folder: Path, server: FakeServer) -> None:
    settings = WatchSettings(folder, settle=0.0, tick=0.001, once=True)
    Daemon(settings, server.client(), OPTIONS).run()


def fill(folder: Path) -> None:
    """Two files to do (one clashes with an earlier `talk.wav` in done/), one that fails, and a text file."""
    (folder / "done").mkdir()
    (folder / "done" / "talk.wav").write_bytes(b"an earlier talk")
    (folder / "talk.wav").write_bytes(b"talk audio")
    (folder / "memo.mp3").write_bytes(b"memo audio")
    (folder / "bad.wav").write_bytes(b"not audio")
    (folder / "notes.txt").write_text("left alone")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def body(markdown: bytes) -> str:
    return markdown.decode().split("---\n", 2)[2]


def check_outcome(folder: Path) -> None:
    """Every file in done/ or failed/ exactly once, with complete outputs; nothing else left behind."""
    found = files(folder)
    expected = {"notes.txt", ".mlxpool/lock", "done/talk.wav", "failed/bad.wav", "failed/bad.error.txt"}
    expected |= {f"done/{stem}{e}" for stem in ("talk-2", "memo") for e in ("_raw.md", "_corrected.md")}
    expected |= {"done/talk-2.wav", "done/memo.mp3"}
    assert set(found) == expected
    assert (found["done/talk.wav"], found["done/talk-2.wav"]) == (b"an earlier talk", b"talk audio")
    assert found["failed/bad.wav"] == b"not audio"
    assert b"400 invalid_audio: file: not a readable audio file" in found["failed/bad.error.txt"]
    for stem, source in (("talk-2", "talk.wav"), ("memo", "memo.mp3")):
        assert found[f"done/{stem}_raw.md"].startswith(f"---\nsource: {source}\n".encode())
        assert body(found[f"done/{stem}_raw.md"]) == f"\n{TEXT}\n"
        assert body(found[f"done/{stem}_corrected.md"]) == f"\n{TEXT.upper()}\n"


def test_each_file_gets_its_outputs_and_is_archived(tmp_path: Path) -> None:
    fill(tmp_path)
    server = FakeServer()
    run_once(tmp_path, server)
    check_outcome(tmp_path)
    raw = (tmp_path / "done" / "memo_raw.md").read_text()
    assert "duration: 1.0 s\nmodel: fake-asr\nlanguage: english\n" in raw
    assert "\ncorrected_by: fake-llm\n" in (tmp_path / "done" / "memo_corrected.md").read_text()
    # Oldest first; each file is transcribed once and each of its pieces corrected once.
    assert server.paths().count("/v1/audio/transcriptions") == 3
    assert server.paths().count("/v1/chat/completions") == 6


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_kill_at_any_step_is_recovered_without_loss_or_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    for step in itertools.count(1):
        folder = tmp_path / f"{step}"
        folder.mkdir()
        fill(folder)
        server = FakeServer()
        with monkeypatch.context() as patch:
            killer = itertools.count(1)
            for name in STEPS:
                patch.setattr(os, name, killing(getattr(os, name), killer, step, after))
            with contextlib.suppress(Killed):
                run_once(folder, server)
            steps_taken = next(killer) - 1
        run_once(folder, server)  # the restart
        check_outcome(folder)
        # Redone at most: the request the kill interrupted (a file's transcription, or one piece).
        assert server.paths().count("/v1/audio/transcriptions") <= 4
        assert server.paths().count("/v1/chat/completions") <= 7
        if steps_taken < step:  # this run got through every step: no later step to kill at
            break
    assert step > 30  # the kills did land at many points


def killing(call: Callable[..., Any], counter: itertools.count[int], step: int, after: bool) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if next(counter) != step:
            return call(*args, **kwargs)
        if after:
            call(*args, **kwargs)
        raise Killed

    return wrapped


def test_a_refused_api_key_stops_the_daemon_and_keeps_the_job(tmp_path: Path) -> None:
    (tmp_path / "talk.wav").write_bytes(b"talk audio")
    server = FakeServer()
    server.fail = lambda request: httpx.Response(401, json=error("invalid API key", "invalid_api_key"))
    with pytest.raises(ServerAuthError):
        run_once(tmp_path, server)
    assert not (tmp_path / "failed").exists()
    server.fail = lambda request: None
    run_once(tmp_path, server)
    assert sorted(os.listdir(tmp_path / "done")) == ["talk.wav", "talk_corrected.md", "talk_raw.md"]


def test_a_server_busy_past_its_retries_fails_the_file(tmp_path: Path) -> None:
    (tmp_path / "talk.wav").write_bytes(b"talk audio")
    server = FakeServer()
    busy = httpx.Response(503, json=error("no memory", "memory_budget_exceeded"))
    server.fail = lambda request: busy if request.url.path == "/v1/chat/completions" else None
    run_once(tmp_path, server)
    assert sorted(os.listdir(tmp_path / "failed")) == ["talk.error.txt", "talk.wav", "talk_raw.md"]
    assert (
        "503 memory_budget_exceeded: no memory (after 5 retries)"
        in (tmp_path / "failed" / "talk.error.txt").read_text()
    )
    assert server.paths().count("/v1/chat/completions") == 6
