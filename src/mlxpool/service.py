"""`mlxpool service`: run the server (or the watch daemon) as a per-user service that starts at login.

One `Service` (the command line, environment, log paths) is rendered two ways: a launchd agent in
`~/Library/LaunchAgents` on macOS, a systemd user unit on Linux. The commands drive `launchctl` / `systemctl --user`.
"""

from __future__ import annotations

import argparse
import os
import platform
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlxpool import logs
from mlxpool.config import Settings, load_settings, shipped_config_path

PASSED_ENV = ("PATH", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN")
"""Variables copied from the installing shell, with every `MLXPOOL_*` one. They may hold secrets (API keys,
HF_TOKEN): the service file is written readable by its owner only."""
NOT_RUNNING = 3
"""Exit status of `status` for a service that is not running (systemctl's convention)."""


@dataclass(frozen=True)
class Service:
    """What runs, as what, with which environment: the same for launchd and systemd."""

    name: str
    """`server` or `watch`."""
    arguments: list[str]
    environment: dict[str, str]
    logs_dir: Path
    working_dir: Path
    description: str = ""

    @property
    def output_log(self) -> Path:
        """Where launchd sends the process's stdout and stderr (systemd sends them to the journal)."""
        return self.logs_dir / f"{self.name}.out.log"


def label(name: str) -> str:
    return f"com.mlxpool.{name}"


def unit(name: str) -> str:
    return f"mlxpool-{name}.service"


def build(
    name: str,
    settings: Settings,
    config: Path,
    env: Mapping[str, str],
    watch_dir: str | None = None,
    extra_env: Sequence[str] = (),
    python: str = sys.executable,
) -> Service:
    """The service for `mlxpool serve --config CONFIG` (or `mlxpool watch DIR`) with this Python."""
    if name == "server":
        command = ["serve", "--config", str(config)]
        description = "mlxpool: OpenAI-compatible server over a pool of MLX models"
    else:  # without a folder, watch takes $MLXPOOL_WATCH_DIR (passed on below) or its default
        command = ["watch", *([str(Path(watch_dir).expanduser().resolve())] if watch_dir else [])]
        description = "mlxpool watch: transcribes audio files that appear in a folder"
    environment = {key: env[key] for key in PASSED_ENV if env.get(key)}
    environment |= {k: v for k, v in env.items() if k.startswith("MLXPOOL_")}
    # The config for every mlxpool command the service runs (watch reads it too), and output as it is written.
    environment |= {"MLXPOOL_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    environment |= dict(_assignment(item) for item in extra_env)
    return Service(
        name=name,
        arguments=[python, "-m", "mlxpool", *command],
        environment=environment,
        logs_dir=Path(settings.server.logs_dir).expanduser(),
        working_dir=Path(env.get("HOME") or Path.home()),
        description=description,
    )


def _assignment(item: str) -> tuple[str, str]:
    key, equals, value = item.partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise SystemExit(f"mlxpool service: --env takes KEY=VALUE, not {item!r}")
    return key, value


def render_plist(service: Service) -> bytes:
    """The launchd agent: started at login (RunAtLoad), restarted whenever it exits (KeepAlive)."""
    agent = {
        "Label": label(service.name),
        "ProgramArguments": service.arguments,
        "EnvironmentVariables": service.environment,
        "WorkingDirectory": str(service.working_dir),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 10,
        # Without a ProcessType, launchd throttles the job's CPU and I/O a little; a server should not be throttled.
        "ProcessType": "Interactive",
        "StandardOutPath": str(service.output_log),
        "StandardErrorPath": str(service.output_log),
    }
    return plistlib.dumps(agent)


def render_unit(service: Service) -> str:
    """The systemd user unit: enabled for default.target, restarted whenever it exits."""
    environment = [f"Environment={_quoted(f'{k}={v}', variables=False)}" for k, v in service.environment.items()]
    return "\n".join(
        [
            "[Unit]",
            f"Description={service.description}",
            "",
            "[Service]",
            "Type=exec",
            f"ExecStart={' '.join(_quoted(a) for a in service.arguments)}",
            *environment,
            f"WorkingDirectory={_escaped(str(service.working_dir), variables=False)}",
            "Restart=always",
            "RestartSec=5",
            "TimeoutStopSec=30",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _escaped(text: str, variables: bool = True) -> str:
    """`text` as systemd reads it literally: `%` starts a specifier everywhere, `$` a variable in ExecStart=."""
    text = text.replace("%", "%%")
    return text.replace("$", "$$") if variables else text


def _quoted(word: str, variables: bool = True) -> str:
    """One argument of ExecStart= (or assignment of Environment=), in double quotes when it needs them."""
    word = _escaped(word, variables)
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Launchd:
    """`launchctl` in the user's GUI domain: bootstrap loads (and, with RunAtLoad, starts), bootout unloads."""

    home: Path
    uid: int = field(default_factory=os.getuid)
    program: str = "launchctl"

    def path(self, name: str) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{label(name)}.plist"

    def render(self, service: Service) -> bytes:
        return render_plist(service)

    def target(self, name: str) -> str:
        return f"gui/{self.uid}/{label(name)}"

    def loaded(self, name: str) -> bool:
        return _call([self.program, "print", self.target(name)], quiet=True) == 0

    def bootstrap(self, name: str) -> list[list[str]]:
        return [
            [self.program, "enable", self.target(name)],
            [self.program, "bootstrap", f"gui/{self.uid}", str(self.path(name))],
        ]

    def install(self, name: str) -> list[list[str]]:
        return self.uninstall(name) + self.bootstrap(name)

    def uninstall(self, name: str) -> list[list[str]]:
        return [[self.program, "bootout", self.target(name)]] if self.loaded(name) else []

    def start(self, name: str) -> list[list[str]]:
        return [[self.program, "kickstart", self.target(name)]] if self.loaded(name) else self.bootstrap(name)

    def stop(self, name: str) -> list[list[str]]:
        return self.uninstall(name)

    def restart(self, name: str) -> list[list[str]]:
        return [[self.program, "kickstart", "-k", self.target(name)]] if self.loaded(name) else self.bootstrap(name)

    def status(self, name: str) -> int:
        result = subprocess.run([self.program, "print", self.target(name)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{label(name)}: installed, not loaded (mlxpool service start {name})")
            return NOT_RUNNING
        facts = dict(re.findall(r"^\s*(state|pid|last exit code) = (.+)$", result.stdout, re.MULTILINE))
        state = facts.get("state", "unknown")
        details = [f"{key} {facts[key]}" for key in ("pid", "last exit code") if key in facts]
        print(f"{label(name)}: {state}" + (f" ({', '.join(details)})" if details else ""))
        return 0 if state == "running" else NOT_RUNNING


@dataclass
class Systemd:
    """`systemctl --user`: the unit lives in ~/.config/systemd/user and is enabled for default.target."""

    config_home: Path
    program: str = "systemctl"

    def path(self, name: str) -> Path:
        return self.config_home / "systemd" / "user" / unit(name)

    def render(self, service: Service) -> bytes:
        return render_unit(service).encode()

    def systemctl(self, *args: str) -> list[str]:
        return [self.program, "--user", *args]

    def install(self, name: str) -> list[list[str]]:
        # restart, not start: a reinstall replaces a running server with one on the new unit.
        return [self.systemctl("daemon-reload"), self.systemctl("enable", unit(name)), *self.restart(name)]

    def uninstall(self, name: str) -> list[list[str]]:
        return [self.systemctl("disable", "--now", unit(name))]

    def start(self, name: str) -> list[list[str]]:
        return [self.systemctl("start", unit(name))]

    def stop(self, name: str) -> list[list[str]]:
        return [self.systemctl("stop", unit(name))]

    def restart(self, name: str) -> list[list[str]]:
        return [self.systemctl("restart", unit(name))]

    def status(self, name: str) -> int:
        return _call(self.systemctl("status", "--no-pager", unit(name)))


def init_system(kind: str | None, env: Mapping[str, str]) -> Launchd | Systemd:
    """launchd on macOS, systemd elsewhere, unless `kind` says which."""
    home = Path(env.get("HOME") or Path.home())
    if (kind or ("launchd" if platform.system() == "Darwin" else "systemd")) == "launchd":
        return Launchd(home)
    return Systemd(Path(env.get("XDG_CONFIG_HOME") or home / ".config"))


def _call(command: list[str], quiet: bool = False) -> int:
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, stdout=output, stderr=output, check=False).returncode


def _run_all(commands: list[list[str]]) -> int:
    for command in commands:
        print("+ " + " ".join(command), file=sys.stderr)
        code = _call(command)
        if code != 0:
            print(f"mlxpool service: `{' '.join(command)}` failed with exit status {code}", file=sys.stderr)
            return code
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    system = init_system(args.system, os.environ)
    if args.action == "install":
        return _install(system, _service(args), args.dry_run)
    if args.action == "uninstall":
        return _uninstall(system, args.name, args.dry_run)
    path = system.path(args.name)
    if not path.exists():
        print(f"mlxpool service: {args.name} is not installed ({path}); run: mlxpool service install {args.name}")
        return NOT_RUNNING if args.action == "status" else 1
    if code := _checked(system):
        return code
    if args.action == "status":
        return system.status(args.name)
    actions = {"start": system.start, "stop": system.stop, "restart": system.restart}
    return _run_all(actions[args.action](args.name))


def _service(args: argparse.Namespace) -> Service:
    env = os.environ
    config = Path(args.config or env.get("MLXPOOL_CONFIG") or shipped_config_path()).expanduser().resolve()
    settings = load_settings(config, env)  # a bad file fails now, not in a restart loop
    return build(args.name, settings, config, env, args.dir, args.env)


def _install(system: Launchd | Systemd, service: Service, dry_run: bool) -> int:
    path, text = system.path(service.name), system.render(service)
    if dry_run:
        print(f"# {path}\n{text.decode()}")
        print("# then: " + "; ".join(" ".join(c) for c in _would_install(system, service.name)))
        return 0
    if code := _checked(system):
        return code
    service.logs_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(text)
    print(f"wrote {path}")
    if code := _run_all(system.install(service.name)):
        return code
    print(f"{service.name} installed and started; it starts again at login. Log: mlxpool logs {service.name} -f")
    if isinstance(system, Systemd):
        print("to keep it running while you are logged out: loginctl enable-linger $USER")
    return 0


def _would_install(system: Launchd | Systemd, name: str) -> list[list[str]]:
    if isinstance(system, Launchd):  # a dry run does not ask launchctl what is loaded
        return [[system.program, "bootout", system.target(name)], *system.bootstrap(name)]
    return system.install(name)


def _uninstall(system: Launchd | Systemd, name: str, dry_run: bool) -> int:
    path = system.path(name)
    if dry_run:
        print(f"# would stop {name} and remove {path}")
        return 0
    if not path.exists():
        print(f"{name} is not installed ({path} does not exist)")
        return 0
    if code := _checked(system):
        return code
    code = _run_all(system.uninstall(name))
    path.unlink()
    if isinstance(system, Systemd):
        _call(system.systemctl("daemon-reload"))
    print(f"removed {path}")
    return code


def _checked(system: Launchd | Systemd) -> int:
    if shutil.which(system.program) is None:
        print(f"mlxpool service: `{system.program}` is not on PATH", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `mlxpool service ACTION [server|watch]`."""
    parser = commands.add_parser("service", help="run the server (or watch) at login: launchd or systemd --user")
    actions = parser.add_subparsers(required=True, metavar="ACTION", dest="action")
    for action, text in [
        ("install", "write the service file, enable it and start it"),
        ("uninstall", "stop the service and remove its file"),
        ("start", "start it"),
        ("stop", "stop it (it starts again at the next login)"),
        ("restart", "restart it (launchctl kickstart -k, systemctl --user restart)"),
        ("status", "is it running? exit 0 when it is"),
    ]:
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name", nargs="?", choices=logs.NAMES, default="server", help="which (default: server)")
        sub.add_argument("--system", choices=("launchd", "systemd"), help="default: launchd on macOS, else systemd")
        if action == "install":
            sub.add_argument("--config", help="models.toml to serve (default: $MLXPOOL_CONFIG or the shipped one)")
            sub.add_argument("--dir", help="watch: the folder to watch (default: watch's own default)")
            sub.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more environment")
        if action in ("install", "uninstall"):
            sub.add_argument("--dry-run", action="store_true", help="print the file and commands, change nothing")
        sub.set_defaults(func=cmd_service, url=None)
    logged = actions.add_parser("logs", help="print its log (the same as `mlxpool logs`)")
    logs.add_arguments(logged)
    logged.set_defaults(func=logs.cmd_logs, url=None)
