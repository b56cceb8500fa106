"""`mlxpool watch` and `mlxpool transcribe` as processes, against `mlxpool serve --demo` on real sockets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.test_audio_io import tone, write
from tests.test_real_models import SPOKEN, espeak_wav, word_error_rate
from tests.test_server import Running, free_ports, wait_ready

RATE = 16000


def clip(seconds: float = 1.0, hz: float = 440.0) -> bytes:
    """A tone as a wav file (the demo's random-weight Whisper transcribes it into something short)."""
    t = np.arange(int(RATE * seconds)) / RATE
    return write("wav", "pcm_s16le", (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None], RATE)


def start_server(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`mlxpool serve ARGS`, its output in MLXPOOL_LOGS_DIR/stderr.txt (a pipe nobody reads could fill up)."""
    command = [sys.executable, "-m", "mlxpool", "serve", *args]
    logs = Path(env["MLXPOOL_LOGS_DIR"])
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stderr.txt", "a") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=output, text=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    ports = free_ports(2)
    cache = tmp_path_factory.mktemp("cache")
    env = {
        **os.environ,
        "MLXPOOL_CACHE_DIR": str(cache),
        "MLXPOOL_LOGS_DIR": str(tmp_path_factory.mktemp("logs")),
        "MLXPOOL_PORTS": ",".join(map(str, ports)),
    }
    process = start_server(env, "--demo")
    try:
        wait_ready(f"http://127.0.0.1:{ports[0]}", process)
        yield Running(process, ports, env)
    finally:
        process.kill()
        process.wait()


def watch(server: Running, folder: Path, *flags: str, log: Path | None = None) -> subprocess.Popen[str]:
    """`mlxpool watch FOLDER` with the test's settings; its log goes to `log` (a pipe could fill and block it)."""
    command = [sys.executable, "-m", "mlxpool", "watch", str(folder), "--url", server.url(), "--settle", "0.3"]
    with open(log or folder.parent / "watch.log", "a") as output:
        return subprocess.Popen([*command, "--max-tokens", "4", *flags], env=server.env, stderr=output, text=True)


def transcribe(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mlxpool", "transcribe", *args, "--url", url, "--max-tokens", "4"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met in {timeout} s"
        time.sleep(0.05)


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def listing(folder: Path) -> set[str]:
    """Every file under `folder`, relative, hidden state included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def header(path: Path) -> dict[str, str]:
    text = path.read_text()
    assert text.startswith("---\n"), text
    fields = text.split("---\n")[1].splitlines()
    return {key: value for key, _, value in (line.partition(": ") for line in fields)}


def test_folder_flow_outputs_archive_clashes_and_failures(server: Running, tmp_path: Path) -> None:
    folder = tmp_path / "transcribe"
    folder.mkdir()
    daemon = watch(server, folder)
    try:
        (folder / "notes.txt").write_text("not audio: left alone")
        (folder / "talk.wav").write_bytes(clip())
        (folder / "call.mp3").write_bytes(write("mp3", "libmp3lame", tone(44100, 2, 1.0), 44100))
        done = folder / "done"
        outputs = {f"{stem}{ending}" for stem in ("talk", "call") for ending in ("_raw.md", "_corrected.md")}
        wait_for(lambda: names(done) == outputs | {"talk.wav", "call.mp3"}, what="both archived")
        assert (done / "talk.wav").read_bytes() == clip()
        raw = header(done / "talk_raw.md")
        assert raw.pop("date").startswith(time.strftime("%Y-"))
        assert raw == {"source": "talk.wav", "duration": "1.0 s", "model": "demo-asr", "language": "english"}
        corrected = header(done / "call_corrected.md")
        assert (corrected["source"], corrected["model"]) == ("call.mp3", "demo-asr")
        assert corrected["corrected_by"] == "demo-chat"
        assert (folder / "notes.txt").exists()

        second = [sys.executable, "-m", "mlxpool", "watch", str(folder), "--once", "--url", server.url()]
        busy = subprocess.run(second, capture_output=True, text=True, timeout=60, env=server.env)
        assert busy.returncode == 1 and "another `mlxpool watch` is running" in busy.stderr

        # The same name again: archived beside the first, which stays as it was.
        (folder / "talk.wav").write_bytes(clip(1.5))
        # Not audio, though named so; and silence: both refused by the server, so both go to failed/.
        (folder / "broken.wav").write_bytes(b"this is no audio" * 100)
        (folder / "quiet.wav").write_bytes(write("wav", "pcm_s16le", np.zeros((1, RATE), np.float32), RATE))
        wait_for(lambda: (done / "talk-2.wav").exists(), what="the second talk.wav archived")  # its audio: last
        wait_for(lambda: len(names(folder / "failed")) == 4, what="two failures archived")
        # A job's folder goes last, just after its files are archived; stopping before that would leave it for
        # the next run to finish (crash safety), which this test is not about.
        wait_for(lambda: not names(folder / ".mlxpool" / "work"), what="every job folder removed")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)

    assert header(done / "talk-2_raw.md")["duration"] == "1.5 s" and header(done / "talk_raw.md")["duration"] == "1.0 s"
    failed = folder / "failed"
    assert set(os.listdir(failed)) == {"broken.wav", "broken.error.txt", "quiet.wav", "quiet.error.txt"}
    assert "400 invalid_audio" in (failed / "broken.error.txt").read_text()
    assert "silent" in (failed / "quiet.error.txt").read_text()
    leftovers = {p for p in listing(folder) if not p.startswith(("done/", "failed/"))}
    assert leftovers == {"notes.txt", ".mlxpool/lock"}


def test_a_backlog_waiting_at_start_up_is_processed(server: Running, tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i in range(3):
        (folder / f"backlog{i}.wav").write_bytes(clip(1.0, 440 + 100 * i))
    daemon = watch(server, folder, "--once")
    assert daemon.wait(timeout=60) == 0
    assert sorted(os.listdir(folder / "done")) == sorted(
        f"backlog{i}{e}" for i in range(3) for e in (".wav", "_raw.md", "_corrected.md")
    )


def test_a_file_copied_in_slowly_is_taken_once_whole(server: Running, tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    daemon = watch(server, folder, "--settle", "1.0")  # ten times the writer's pauses, even on a busy machine
    data = clip(3.0)
    step = len(data) // 20
    try:
        wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), what="the daemon watching")
        with open(folder / "slow.wav", "wb") as file:
            for i in range(0, len(data), step):
                file.write(data[i : i + step])
                file.flush()
                time.sleep(0.1)  # the file keeps changing until it is closed, 2 s from now
        wait_for(lambda: (folder / "done" / "slow.wav").exists(), what="slow.wav archived")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert header(folder / "done" / "slow_raw.md")["duration"] == "3.0 s"
    assert sorted(os.listdir(folder / "done")) == ["slow.wav", "slow_corrected.md", "slow_raw.md"]
    assert (folder / "done" / "slow.wav").read_bytes() == data


def test_kill_9_at_random_moments_loses_nothing_and_repeats_nothing(server: Running, tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    clips = [f"clip{i:02d}.wav" for i in range(20)]
    for i, name in enumerate(clips):
        (folder / name).write_bytes(clip(1.0, 300 + 20 * i))
    rng = random.Random(20)
    for _ in range(12):
        daemon = watch(server, folder)
        time.sleep(rng.uniform(0.4, 2.0))
        daemon.kill()
        daemon.wait()
        if len(names(folder / "done")) == 3 * len(clips):
            break
    finishing = watch(server, folder, "--once")
    assert finishing.wait(timeout=90) == 0

    expected = {f"done/{n[:-4]}{e}" for n in clips for e in (".wav", "_raw.md", "_corrected.md")}
    assert listing(folder) == expected | {".mlxpool/lock"}
    for i, name in enumerate(clips):
        assert (folder / "done" / name).read_bytes() == clip(1.0, 300 + 20 * i)
        assert header(folder / "done" / f"{name[:-4]}_corrected.md")["source"] == name
    log = (tmp_path / "watch.log").read_text()
    assert "Traceback" not in log and log.count("archived to done/") >= len(clips)


def test_transcribe_once_in_each_format(server: Running, tmp_path: Path) -> None:
    audio = tmp_path / "memo.wav"
    audio.write_bytes(clip(2.0))
    md = transcribe(server.url(), str(audio), "--correct")
    assert md.returncode == 0, md.stderr
    fields = header_of(md.stdout)
    assert (fields["source"], fields["duration"], fields["corrected_by"]) == ("memo.wav", "2.0 s", "demo-chat")

    txt = transcribe(server.url(), str(audio), "--format", "txt")
    assert txt.returncode == 0 and not txt.stdout.startswith("---") and txt.stdout.endswith("\n")

    out = tmp_path / "memo.srt"
    srt = transcribe(server.url(), str(audio), "--format", "srt", "--correct", "-o", str(out))
    assert srt.returncode == 0 and srt.stdout == ""
    cues = out.read_text().split("\n\n")
    assert cues[0].startswith("1\n00:00:0") and " --> " in cues[0]

    missing = transcribe(server.url(), str(tmp_path / "nope.wav"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    refused = transcribe(server.url(), str(audio), env={**server.env, "MLXPOOL_ASR_MODEL": "no-such-model"})
    assert refused.returncode == 1 and "404 model_not_found" in refused.stderr
    no_prompt = transcribe(server.url(), str(audio), "--correct", "--prompt-file", str(tmp_path / "none.txt"))
    assert no_prompt.returncode == 1 and "cannot read the prompt file" in no_prompt.stderr


def header_of(text: str) -> dict[str, str]:
    fields = text.split("---\n")[1].splitlines()
    return {key: value for key, _, value in (line.partition(": ") for line in fields)}


def test_a_budget_too_small_for_both_models_evicts_one_for_the_other(server: Running, tmp_path: Path) -> None:
    for name in ("demo-asr", "demo-chat"):
        assert httpx.post(f"{server.url()}/admin/models/{name}/load", timeout=60).status_code == 200
    models = {m["name"]: m for m in httpx.get(f"{server.url()}/admin/models").json()["models"]}
    asr, chat = models["demo-asr"], models["demo-chat"]
    # The budget holds either model's reservation, but not one loaded model beside the other's reservation.
    fits_one = max(asr["estimated_bytes"], chat["estimated_bytes"])
    fits_both = min(asr["measured_bytes"] + chat["estimated_bytes"], chat["measured_bytes"] + asr["estimated_bytes"])
    assert fits_one < fits_both
    demo = Path(server.env["MLXPOOL_CACHE_DIR"]) / "demo"
    config = write_config(
        tmp_path / "small.toml",
        {
            "demo-asr": {"kind": "asr", "path": str(demo / "demo-asr"), "preload": True, "memory_reserve": "16MB"},
            "demo-chat": {"kind": "chat", "path": str(demo / "demo-chat"), "memory_reserve": "16MB"},
        },
        memory_budget=(fits_one + fits_both) // 2,
    )
    ports = free_ports(2)
    env = {**server.env, "MLXPOOL_PORTS": ",".join(map(str, ports))}
    url = f"http://127.0.0.1:{ports[0]}"
    audio = tmp_path / "memo.wav"
    audio.write_bytes(clip())
    # Started before the server: the refused connections are retried until it is up.
    command = [sys.executable, "-m", "mlxpool", "transcribe", str(audio), "--correct", "--url", url]
    first = subprocess.Popen([*command, "--max-tokens", "4"], env=env, stdout=PIPE, stderr=PIPE, text=True)
    time.sleep(1.0)
    small = start_server(env, "--config", str(config))
    try:
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert "server unreachable" in err and header_of(out)["corrected_by"] == "demo-chat"
        assert states(url) == {"demo-asr": "absent", "demo-chat": "ready"}
        again = transcribe(url, str(audio), env=env)
        assert again.returncode == 0, again.stderr
        assert states(url) == {"demo-asr": "ready", "demo-chat": "absent"}
    finally:
        small.kill()
        small.wait()


def write_config(path: Path, models: dict[str, dict[str, Any]], **server: Any) -> Path:
    """A models.toml: each model the default of its kind."""
    lines = ["[server]", *(f"{k} = {json.dumps(v)}" for k, v in server.items())]
    for name, fields in models.items():
        lines += [f"[models.{name}]", "default = true", *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def states(url: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in httpx.get(f"{url}/admin/models").json()["models"]}


@pytest.mark.real
def test_real_models_transcribe_and_correct_espeak_speech(real_models: Path, tmp_path: Path) -> None:
    paths = {name: real_models / name for name in ("whisper-tiny.en", "smollm2-135m-instruct")}
    for path in paths.values():
        assert path.is_dir(), f"{path} is missing: run ../shared/models/fetch_real_weights.sh {real_models}"
    config = write_config(
        tmp_path / "real.toml",
        {
            "whisper": {"kind": "asr", "path": str(paths["whisper-tiny.en"])},
            "smol": {"kind": "chat", "path": str(paths["smollm2-135m-instruct"])},
        },
    )
    ports = free_ports(2)
    env = {
        **os.environ,
        "MLXPOOL_PORTS": ",".join(map(str, ports)),
        "MLXPOOL_CACHE_DIR": str(tmp_path / "cache"),
        "MLXPOOL_LOGS_DIR": str(tmp_path / "logs"),
    }
    process = start_server(env, "--config", str(config))
    folder = tmp_path / "transcribe"
    folder.mkdir()
    (folder / "speech.wav").write_bytes(espeak_wav(SPOKEN))
    try:
        wait_ready(f"http://127.0.0.1:{ports[0]}", process)
        url = f"http://127.0.0.1:{ports[0]}"
        command = [sys.executable, "-m", "mlxpool", "watch", str(folder), "--once", "--settle", "0.2", "--url", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
    finally:
        process.kill()
        process.wait()
    raw = (folder / "done" / "speech_raw.md").read_text()
    raw_fields, raw_text = header_of(raw), raw.split("---\n", 2)[2]
    assert raw_fields["model"] == "whisper" and raw_fields["language"] == "english"
    assert word_error_rate(SPOKEN, raw_text) <= 0.25, raw_text
    corrected = (folder / "done" / "speech_corrected.md").read_text()
    assert header_of(corrected)["corrected_by"] == "smol"
    assert corrected.split("---\n", 2)[2].strip(), corrected


def test_a_folder_that_cannot_be_made_is_an_error_message(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "MLXPOOL_LOGS_DIR": str(tmp_path / "logs")}
    command = [sys.executable, "-m", "mlxpool", "watch", str(tmp_path / "a-file" / "inbox"), "--once"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("mlxpool watch: cannot use ") and "Traceback" not in done.stderr
