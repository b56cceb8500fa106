"""`mlxpool service`: the launchd plist and the systemd unit, and the commands run against fake init systems."""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpool import service
from mlxpool.cli import main
from mlxpool.config import settings_from_dict

# A stand-in for launchctl and systemctl: records its arguments; launchctl's keeps whether the job is loaded.
FAKE = """#!{python}
import json, os, sys
from pathlib import Path

state = Path(os.environ["FAKE_INIT_STATE"])
with (state / "calls.jsonl").open("a") as calls:
    calls.write(json.dumps([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\\n")
loaded = state / "loaded"
verb = sys.argv[1] if len(sys.argv) > 1 else ""
if verb == "bootstrap":
    loaded.touch()
elif verb == "bootout":
    loaded.unlink()
elif verb == "print":
    if not loaded.exists():
        sys.exit(113)
    print("gui/501/com.mlxpool.server = {{\\n\\tstate = running\\n\\tpid = 4242\\n\\tlast exit code = 0\\n}}")
sys.exit(int(os.environ.get("FAKE_INIT_EXIT", "0")))
"""
UID = os.getuid()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with a config, fake launchctl and systemctl first on PATH, and logs under it."""
    bin_dir, state = tmp_path / "bin", tmp_path / "init-state"
    bin_dir.mkdir()
    state.mkdir()
    for name in ("launchctl", "systemctl"):
        fake = bin_dir / name
        fake.write_text(FAKE.format(python=sys.executable))
        fake.chmod(0o755)
    (tmp_path / "models.toml").write_text('[models.e]\nkind = "embedding"\npath = "e"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    monkeypatch.setenv("FAKE_INIT_STATE", str(state))
    monkeypatch.setenv("MLXPOOL_LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("MLXPOOL_CONFIG", raising=False)
    return tmp_path


def calls(home: Path) -> list[list[str]]:
    """The commands the fakes ran since the last look."""
    log = home / "init-state" / "calls.jsonl"
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    log.unlink()
    return [json.loads(line) for line in lines]


def a_service(tmp_path: Path, config: Path, env: dict[str, str] | None = None) -> service.Service:
    settings = settings_from_dict({"server": {"logs_dir": str(tmp_path / "logs")}}, config, {})
    return service.build("server", settings, config, {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **(env or {})})


def test_the_plist_has_what_launchd_needs(tmp_path: Path) -> None:
    config = tmp_path / "my models.toml"
    agent = plistlib.loads(service.render_plist(a_service(tmp_path, config, {"MLXPOOL_PORTS": "9000,9001"})))
    assert agent["Label"] == "com.mlxpool.server"
    assert agent["ProgramArguments"] == [sys.executable, "-m", "mlxpool", "serve", "--config", str(config)]
    assert Path(agent["ProgramArguments"][0]).is_absolute()
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] is True
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(tmp_path / "logs" / "server.out.log")
    assert agent["WorkingDirectory"] == str(tmp_path)
    assert agent["EnvironmentVariables"] == {
        "PATH": "/usr/bin:/bin",
        "MLXPOOL_PORTS": "9000,9001",
        "MLXPOOL_CONFIG": str(config),
        "PYTHONUNBUFFERED": "1",
    }
    assert all(isinstance(v, str) for v in agent["EnvironmentVariables"].values())


def test_the_unit_quotes_what_systemd_would_read_otherwise(tmp_path: Path) -> None:
    config = tmp_path / 'a "b" 100%$x.toml'
    text = service.render_unit(a_service(tmp_path, config, {"MLXPOOL_API_KEYS": "k$1,k%2"}))
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("Env"))
    # systemd reads double quotes with backslash escapes as a POSIX shell does, then `%%` as `%`, `$$` as `$`.
    argv = [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(lines["ExecStart"])]
    assert argv == [sys.executable, "-m", "mlxpool", "serve", "--config", str(config)]
    assert "Environment=MLXPOOL_API_KEYS=k$1,k%%2" in text.splitlines()  # `$` is literal in Environment=
    assert lines["Restart"] == "always" and lines["WantedBy"] == "default.target"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    config = tmp_path / "odd % $name's dir" / "models.toml"
    extra = ["LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", 'NOTE=say "hi" 50%']
    settings = settings_from_dict({}, config, {})
    built = service.build("server", settings, config, {"HOME": str(tmp_path), "PATH": "/usr/bin"}, extra_env=extra)
    unit = tmp_path / service.unit("server")
    unit.write_text(service.render_unit(built))
    runtime = tmp_path / "runtime"  # --user verify needs a runtime dir, which a container may not have
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(
        [analyze, "--user", "verify", str(unit)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert unit.name not in result.stderr, result.stderr  # no warning about the unit itself


def test_install_restart_status_stop_start_uninstall_with_launchctl(home: Path) -> None:
    plist = home / "Library" / "LaunchAgents" / "com.mlxpool.server.plist"
    target = f"gui/{UID}/com.mlxpool.server"
    assert main(["service", "install", "--system", "launchd", "--config", str(home / "models.toml")]) == 0
    assert plistlib.loads(plist.read_bytes())["Label"] == "com.mlxpool.server"
    assert stat.S_IMODE(plist.stat().st_mode) == 0o600  # it may hold API keys
    assert (home / "logs").is_dir()
    assert calls(home) == [
        ["launchctl", "print", target],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist)],
    ]
    assert main(["service", "restart", "--system", "launchd"]) == 0
    assert calls(home) == [["launchctl", "print", target], ["launchctl", "kickstart", "-k", target]]
    assert main(["service", "status", "--system", "launchd"]) == 0
    assert main(["service", "stop", "--system", "launchd"]) == 0
    assert calls(home)[-1] == ["launchctl", "bootout", target]
    assert main(["service", "status", "--system", "launchd"]) == service.NOT_RUNNING
    assert main(["service", "start", "--system", "launchd"]) == 0
    assert calls(home)[-1] == ["launchctl", "bootstrap", f"gui/{UID}", str(plist)]
    assert main(["service", "start", "--system", "launchd"]) == 0  # already loaded: kickstart
    assert calls(home)[-1] == ["launchctl", "kickstart", target]
    assert main(["service", "uninstall", "--system", "launchd"]) == 0
    assert calls(home) == [["launchctl", "print", target], ["launchctl", "bootout", target]]
    assert not plist.exists()


def test_launchd_status_says_running_and_pid(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["service", "install", "--system", "launchd", "--config", str(home / "models.toml")])
    capsys.readouterr()
    assert main(["service", "status", "--system", "launchd"]) == 0
    assert capsys.readouterr().out == "com.mlxpool.server: running (pid 4242, last exit code 0)\n"


def test_install_start_stop_restart_status_uninstall_with_systemctl(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = home / ".config" / "systemd" / "user" / "mlxpool-server.service"
    assert main(["service", "install", "--system", "systemd", "--config", str(home / "models.toml")]) == 0
    assert "ExecStart=" in unit.read_text() and stat.S_IMODE(unit.stat().st_mode) == 0o600
    assert calls(home) == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "mlxpool-server.service"],
        ["systemctl", "--user", "restart", "mlxpool-server.service"],
    ]
    for verb in ("start", "stop", "restart"):
        assert main(["service", verb, "--system", "systemd"]) == 0
        assert calls(home) == [["systemctl", "--user", verb, "mlxpool-server.service"]]
    assert main(["service", "status", "--system", "systemd"]) == 0
    assert calls(home) == [["systemctl", "--user", "status", "--no-pager", "mlxpool-server.service"]]
    monkeypatch.setenv("FAKE_INIT_EXIT", "3")  # systemctl status: not running
    assert main(["service", "status", "--system", "systemd"]) == 3
    monkeypatch.delenv("FAKE_INIT_EXIT")
    calls(home)
    assert main(["service", "uninstall", "--system", "systemd"]) == 0
    assert calls(home) == [
        ["systemctl", "--user", "disable", "--now", "mlxpool-server.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not unit.exists()


def test_a_failing_command_stops_the_install_with_its_status(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_INIT_EXIT", "5")
    assert main(["service", "install", "--system", "systemd", "--config", str(home / "models.toml")]) == 5
    assert calls(home) == [["systemctl", "--user", "daemon-reload"]]


def test_the_watch_service_runs_watch_on_its_folder(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = home / "inbox"
    args = ["service", "install", "watch", "--dir", str(folder), "--system", "launchd", "--dry-run"]
    assert main([*args, "--config", str(home / "models.toml")]) == 0
    text = capsys.readouterr().out
    agent = plistlib.loads(text.split("\n", 1)[1].split("# then:")[0].encode())
    assert agent["Label"] == "com.mlxpool.watch"
    assert agent["ProgramArguments"][-2:] == ["watch", str(folder)]
    assert agent["StandardErrorPath"] == str(home / "logs" / "watch.out.log")


def test_dry_run_prints_the_file_and_changes_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["service", "install", "--system", "systemd", "--dry-run", "--env", "LD_PRELOAD=/lib/x.so"]
    assert main([*args, "--config", str(home / "models.toml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {home / '.config' / 'systemd' / 'user' / 'mlxpool-server.service'}\n[Unit]\n")
    assert "Environment=LD_PRELOAD=/lib/x.so" in out and "# then: systemctl --user daemon-reload;" in out
    assert calls(home) == [] and not (home / ".config").exists() and not (home / "logs").exists()


def test_actions_on_a_service_not_installed(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "start", "--system", "systemd"]) == 1
    assert "not installed" in capsys.readouterr().out
    assert main(["service", "status", "--system", "launchd"]) == service.NOT_RUNNING
    assert main(["service", "uninstall", "--system", "launchd"]) == 0
    assert calls(home) == []


def test_install_refuses_a_bad_config(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = home / "bad.toml"
    bad.write_text('[models.e]\nkind = "nope"\npath = "e"\n')
    assert main(["service", "install", "--system", "systemd", "--config", str(bad)]) == 2
    assert "models.e.kind" in capsys.readouterr().err
    assert calls(home) == [] and not (home / ".config").exists()


def test_a_missing_init_program_is_named(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(home / "empty"))
    assert main(["service", "install", "--system", "launchd", "--config", str(home / "models.toml")]) == 1
    assert "`launchctl` is not on PATH" in capsys.readouterr().err
    assert not (home / "Library").exists()
