"""`mlxpool litellm-config`: the config it writes, and a real LiteLLM proxy in front of `serve --demo`.

The proxy runs from its own virtual environment (`.venv-litellm`, made by .ci/run and `make litellm` from
tests/litellm-requirements.txt): LiteLLM pins huggingface-hub<2 and openai<3, older than what mlxpool is tested with.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from mlxpool import litellm
from mlxpool.cli import main
from mlxpool.config import Settings, settings_from_dict
from mlxpool.demo import demo_config
from tests.api.test_audio_io import tone, write
from tests.test_server import free_ports, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def every_kind(**server: Any) -> Settings:
    models = {
        "qwen": {"kind": "chat", "path": "q", "aliases": ["completions"]},
        "vl": {"kind": "vision", "path": "v"},
        "paddle": {"kind": "ocr", "path": "p", "aliases": ["ocr"]},
        "embed": {"kind": "embedding", "path": "e", "aliases": ["embedding"]},
        "whisper": {"kind": "asr", "path": "w", "aliases": ["asr"]},
        "kitten": {"kind": "tts", "path": "k", "aliases": ["tts"]},
    }
    return settings_from_dict({"server": server, "models": models}, Path("/c/models.toml"), {})


def test_every_name_and_alias_routes_to_the_server_with_its_mode() -> None:
    config = yaml.safe_load(litellm.render(every_kind(), ["http://mac1:8787"]))
    routes = {e["model_name"]: (e["litellm_params"]["model"], e["model_info"]["mode"]) for e in config["model_list"]}
    assert routes == {
        "qwen": ("openai/qwen", "chat"),
        "completions": ("openai/qwen", "chat"),
        "vl": ("openai/vl", "chat"),
        "paddle": ("openai/paddle", "chat"),
        "ocr": ("openai/paddle", "chat"),
        "embed": ("openai/embed", "embedding"),
        "embedding": ("openai/embed", "embedding"),
        "whisper": ("openai/whisper", "audio_transcription"),
        "asr": ("openai/whisper", "audio_transcription"),
        "kitten": ("openai/kitten", "audio_speech"),
        "tts": ("openai/kitten", "audio_speech"),
    }
    params = [e["litellm_params"] for e in config["model_list"]]
    assert {(p["api_base"], p["api_key"]) for p in params} == {("http://mac1:8787/v1", "unused")}
    assert config["router_settings"] == {"num_retries": 2}


def test_several_servers_give_each_name_one_deployment_per_server() -> None:
    urls = ["http://mac1:8787", "http://mac2:8787/"]
    config = yaml.safe_load(litellm.render(every_kind(), urls))
    bases = [e["litellm_params"]["api_base"] for e in config["model_list"] if e["model_name"] == "asr"]
    assert bases == ["http://mac1:8787/v1", "http://mac2:8787/v1"]


def test_api_keys_are_read_from_litellms_environment_never_written() -> None:
    text = litellm.render(every_kind(api_keys=["sk-secret-1"]), ["http://mac1:8787"])
    assert "sk-secret-1" not in text and "set MLXPOOL_API_KEY where LiteLLM runs" in text
    keys = {e["litellm_params"]["api_key"] for e in yaml.safe_load(text)["model_list"]}
    assert keys == {"os.environ/MLXPOOL_API_KEY"}


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:9000"), ("0.0.0.0", "http://127.0.0.1:9000"), ("::1", "http://[::1]:9000")],
)
def test_the_default_url_is_this_server(host: str, url: str) -> None:
    assert litellm.default_url(every_kind(host=host, ports=[9000, 9001])) == url


def test_the_command_prints_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.e]\nkind = "embedding"\npath = "e"\naliases = ["embedding"]\n')
    assert main(["litellm-config", "--config", str(config), "--url", "http://10.0.0.2:8787"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# LiteLLM proxy config for mlxpool at http://10.0.0.2:8787")
    assert [e["model_name"] for e in yaml.safe_load(out)["model_list"]] == ["e", "embedding"]


def litellm_program() -> str:
    """The `litellm` command: $MLXPOOL_LITELLM, else .venv-litellm's, else one on PATH."""
    found = os.environ.get("MLXPOOL_LITELLM") or next(
        (str(p) for p in [ROOT / ".venv-litellm" / "bin" / "litellm"] if p.exists()), shutil.which("litellm")
    )
    if found is None:
        message = "no litellm: make litellm (a venv from tests/litellm-requirements.txt), or set MLXPOOL_LITELLM"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: its absence there is a broken CI, not a reason to skip
        pytest.skip(message)
    return found


@dataclass
class Stack:
    client: openai.OpenAI
    server_log: Path


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`mlxpool serve --demo` and a LiteLLM proxy configured by `litellm.render` in front of it."""
    program = litellm_program()
    root = tmp_path_factory.mktemp("litellm")
    mlxpool_port, proxy_port = free_ports(2)
    env = {
        **os.environ,
        "MLXPOOL_CACHE_DIR": str(root / "cache"),
        "MLXPOOL_LOGS_DIR": str(root / "logs"),
        "MLXPOOL_PORTS": str(mlxpool_port),
    }
    server = start([sys.executable, "-m", "mlxpool", "serve", "--demo"], env, root, root / "mlxpool.out")
    processes = [server]
    try:
        wait_ready(f"http://127.0.0.1:{mlxpool_port}", server, 180, log=root / "mlxpool.out")
        demo = settings_from_dict(demo_config(root / "cache" / "demo"), root / "demo.toml", {})
        (root / "litellm.yaml").write_text(litellm.render(demo, [f"http://127.0.0.1:{mlxpool_port}"]))
        key = "sk-" + secrets.token_hex(24)  # LiteLLM refuses to start without a master key
        proxy_env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        command = [program, "--config", str(root / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(proxy_port)]
        processes.append(start(command, proxy_env, root, root / "litellm.out"))
        wait_ready(f"http://127.0.0.1:{proxy_port}", processes[1], 180, "/health/liveliness", root / "litellm.out")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key=key, max_retries=0)
        yield Stack(client, root / "logs" / "server.log")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_chat_embeddings_and_a_transcription_through_litellm(stack: Stack) -> None:
    answer = stack.client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert answer.choices[0].finish_reason == "length" and answer.usage is not None
    assert answer.usage.completion_tokens == 4
    vectors = stack.client.embeddings.create(model="demo-embedding", input=["hello", "world"])
    assert [len(d.embedding) for d in vectors.data] == [32, 32]
    wav = write("wav", "pcm_s16le", tone(16000, 1, seconds=1.0), 16000)
    transcript = stack.client.audio.transcriptions.create(model="demo-asr", file=("tone.wav", wav, "audio/wav"))
    assert isinstance(transcript.text, str)  # random weights: any text; that it arrived is the point
    # The server's log has one line per request, with the model each route served and the tokens it counted.
    lines = [line.split(": ", 1)[1] for line in stack.server_log.read_text().splitlines() if "mlxpool.access" in line]
    posts = [line.split() for line in lines if line.startswith("POST")]
    assert [line[:3] for line in posts] == [
        ["POST", "/v1/chat/completions", "model=demo-chat"],
        ["POST", "/v1/embeddings", "model=demo-embedding"],
        ["POST", "/v1/audio/transcriptions", "model=demo-asr"],
    ]
    assert (
        posts[0][-1] == f"tokens={answer.usage.total_tokens}" and posts[1][-1] == f"tokens={vectors.usage.total_tokens}"
    )
