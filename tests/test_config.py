from __future__ import annotations

from pathlib import Path

import pytest

from mlxpool.cli import main
from mlxpool.config import load_settings, parse_size, shipped_config_path
from mlxpool.errors import ConfigError
from tests.conftest import make_settings

GOOD = """
[server]
host = "127.0.0.1"
ports = [8787, 8788]
memory_budget = "75%"

[models.my-embedder]
kind = "embedding"
repo = "org/name"
aliases = ["embedding"]
preload = true
ttl = -1
pinned = false
default = true

[models.local]
kind = "embedding"
path = "weights/local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_file_contract_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env={})
    assert settings.server.ports == [8787, 8788]
    spec = settings.models["my-embedder"]
    assert (spec.kind, spec.repo, spec.aliases, spec.preload, spec.ttl, spec.default) == (
        "embedding",
        "org/name",
        ["embedding"],
        True,
        -1,
        True,
    )
    assert settings.models["local"].path == str((tmp_path / "weights/local").resolve())


def test_shipped_config_is_valid_and_has_the_original_stack() -> None:
    settings = load_settings(shipped_config_path(), env={})
    kinds = {spec.kind for spec in settings.models.values()}
    assert {"embedding", "asr", "ocr", "tts"} <= kinds and kinds & {"chat", "vision"}
    aliases = {a for spec in settings.models.values() for a in spec.aliases}
    assert {"completions", "embedding", "ocr", "asr", "tts"} <= aliases
    resident = {spec.kind for spec in settings.models.values() if spec.preload}
    assert resident == {"embedding", "asr"}
    assert next(s for s in settings.models.values() if s.kind == "tts").ttl == 300


def test_environment_overrides_server_fields(tmp_path: Path) -> None:
    env = {"MLXPOOL_PORTS": "9000, 9001", "MLXPOOL_MEMORY_BUDGET": "12GB", "MLXPOOL_HOST": "0.0.0.0"}
    server = load_settings(write(tmp_path, GOOD), env=env).server
    assert (server.ports, server.memory_budget, server.host) == ([9000, 9001], "12GB", "0.0.0.0")


def test_mlxpool_config_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_settings(env={"MLXPOOL_CONFIG": str(path)}).source == str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[models.m]\nkind = "llm"\nrepo = "a/b"', "models.m.kind: Input should be"),
        ('[models.m]\nkind = "embedding"', "models.m: Value error, give exactly one of `repo` or `path`"),
        ('[models.m]\nkind = "embedding"\nrepo = "a/b"\nttl = "soon"', "models.m.ttl:"),
        ('[models.m]\nkind = "embedding"\nrepo = "a/b"\ncolour = 1', "models.m.colour: Extra inputs"),
        ('[server]\nmemory_budget = "lots"', "server.memory_budget: Value error, 'lots' is not a size"),
        ('[server]\nports = "8787"', "server.ports:"),
        ("[models.m\n", "not valid TOML"),
        (
            '[models.a]\nkind = "tts"\nrepo = "a/b"\naliases = ["x"]\n[models.b]\nkind = "tts"\nrepo = "c/d"\n'
            'aliases = ["x"]',
            "models.b.aliases: 'x' is already used by models.a",
        ),
        (
            '[models.a]\nkind = "tts"\nrepo = "a/b"\ndefault = true\n[models.b]\nkind = "tts"\nrepo = "c/d"\n'
            "default = true",
            "models.b.default: tts already has a default",
        ),
    ],
)
def test_bad_files_name_the_file_model_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert str(path) in str(err.value) and expected in str(err.value)


def test_serve_with_a_bad_file_exits_2_with_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[models.m]\nkind = "llm"\nrepo = "a/b"')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models.m.kind:" in err


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml", env={})


def test_sizes() -> None:
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("75%", total=1000) == 750
    assert parse_size(100) == 100
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_defaults_fall_back_to_the_first_model_of_a_kind(tmp_path: Path) -> None:
    text = '[models.a]\nkind = "asr"\nrepo = "a/b"\n[models.b]\nkind = "asr"\nrepo = "c/d"\n'
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.defaults()["asr"].name == "a"


def test_candidates_pick_the_largest_model_the_machine_can_hold(tmp_path: Path) -> None:
    text = """
[models.chat]
kind = "vision"
candidates = [
  { repo = "org/big", min_memory = "32GB" },
  { repo = "org/small", kind = "chat", min_memory = "16GB" },
]
"""
    settings = load_settings(write(tmp_path, text), env={})
    big = settings.for_memory(64 * 2**30).models["chat"]
    assert (big.repo, big.kind) == ("org/big", "vision")
    small = settings.for_memory(16 * 2**30).models["chat"]
    assert (small.repo, small.kind) == ("org/small", "chat")
    assert settings.for_memory(8 * 2**30).models["chat"].repo == "org/small"  # nothing fits: the last one
    assert settings.for_memory(16 * 2**30).name_table()["org/small"] == "chat"


def test_shipped_config_picks_qwen3_14b_on_16gb_and_qwen35_on_32gb() -> None:
    settings = load_settings(shipped_config_path(), env={})
    assert settings.for_memory(16 * 2**30).models["chat"].repo == "mlx-community/Qwen3-14B-4bit"
    assert settings.for_memory(32 * 2**30).models["chat"].repo == "mlx-community/Qwen3.5-35B-A3B-4bit"


def test_candidates_and_a_source_together_are_an_error(tmp_path: Path) -> None:
    text = '[models.m]\nkind = "chat"\nrepo = "a/b"\ncandidates = [{ repo = "c/d" }]\n'
    with pytest.raises(ConfigError, match=r"models\.m: Value error, give `candidates` or `repo`/`path`, not both"):
        load_settings(write(tmp_path, text), env={})


def test_tts_models_unload_after_five_idle_minutes_unless_told_otherwise() -> None:
    settings = make_settings(
        {
            "speech": {"kind": "tts", "path": "/x"},
            "kept": {"kind": "tts", "path": "/x", "ttl": -1},
            "chat": {"kind": "chat", "path": "/x"},
        }
    )
    assert [settings.models[n].ttl for n in ("speech", "kept", "chat")] == [300, -1, -1]
