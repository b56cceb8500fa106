"""Log files: `logs_dir/NAME.log` (rotated by size) beside stderr, and `mlxpool logs` to read them.

The server's file gets every record: one line per request (`mlxpool.access`), the pool's lifecycle events (load,
evict, unload, download progress), uvicorn's start and stop, warnings and errors. stderr keeps what it showed
before, the request lines only at `debug`.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from mlxpool.config import ServerSettings, load_settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "mlxpool.access"
HANDLERS = ("mlxpool-file", "mlxpool-stderr")
NAMES = ("server", "watch")
"""The processes that write log files: `serve` and the `watch` daemon."""


def log_path(server: ServerSettings, name: str = "server") -> Path:
    return Path(server.logs_dir).expanduser() / f"{name}.log"


def configure(server: ServerSettings, name: str = "server") -> Path:
    """Send this process's logging to stderr and to the rotating file `logs_dir/NAME.log`; returns its path."""
    path = log_path(server, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(FORMAT)
    rotating = logging.handlers.RotatingFileHandler(
        path, maxBytes=server.log_max_size, backupCount=server.log_backups, encoding="utf-8"
    )
    rotating.setFormatter(formatter)
    to_file = InBackground(rotating)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(formatter)
    if server.log_level != "debug":
        to_stderr.addFilter(lambda record: not record.name.startswith(ACCESS_LOGGER))
    handlers: list[logging.Handler] = [to_file, to_stderr]
    for handler, handler_name in zip(handlers, HANDLERS, strict=True):
        handler.set_name(handler_name)
    _replace_handlers(handlers)
    logging.getLogger().setLevel(server.log_level.upper())
    # Request lines are the file's main content: kept whatever log_level says.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    return path


class InBackground(logging.handlers.QueueHandler):
    """Hands records to a thread of its own that passes them to `target`. The server logs a line per request from
    its event loop; a file handler's write, flush and rotation check (a stat) there were about a twentieth of the
    loop's time per request (docs/benchmarks.md). Closing writes what is still queued."""

    def __init__(self, target: logging.Handler):
        super().__init__(queue.SimpleQueue())
        self.target = target
        self._listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(
            self.queue, target, respect_handler_level=True
        )
        self._listener.start()

    def flush(self) -> None:
        """Wait until every record handed over so far is written."""
        if self._listener is not None:
            self._listener.stop()
            self._listener.start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
            self.target.close()
        super().close()


def _replace_handlers(handlers: list[logging.Handler]) -> None:
    """Install `handlers` on the root logger in place of those an earlier `configure` installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() in HANDLERS]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)


def tail(path: Path, count: int) -> list[str]:
    """The last `count` lines of the log at `path`, reading back into its rotated files when it is short."""
    lines: list[str] = []
    for file in [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, 100))]:
        if len(lines) >= count or not file.is_file():
            break
        lines = _last_lines(file, count - len(lines)) + lines
    return lines[-count:] if count > 0 else []


def _last_lines(file: Path, count: int, block: int = 65536) -> list[str]:
    with file.open("rb") as f:
        position = f.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:] if count > 0 else []


def follow(path: Path, sleep: Callable[[float], Any] = time.sleep, interval: float = 0.25) -> Iterator[str]:
    """Lines appended to `path` from this call on, forever; follows the file across rotation (`tail -F`)."""
    return _follow(path, _open(path, at_end=True), sleep, interval)


def _follow(path: Path, file: TextIO | None, sleep: Callable[[float], Any], interval: float) -> Iterator[str]:
    pending = ""
    try:
        while True:
            if file is None:
                file = _open(path, at_end=False)  # created since we started: all of it is new
            chunk = file.readline() if file is not None else ""
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending.rstrip("\n")
                    pending = ""
                continue
            if file is not None and _replaced(path, file.fileno(), file.tell()):
                file.close()  # rotated: the rest is in the new file, from its start
                file = _open(path, at_end=False)
                continue
            sleep(interval)
    finally:
        if file is not None:
            file.close()


def _open(path: Path, at_end: bool) -> TextIO | None:
    try:
        file = path.open("r", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if at_end:
        file.seek(0, os.SEEK_END)
    return file


def _replaced(path: Path, fd: int, position: int) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return now.st_ino != os.fstat(fd).st_ino or now.st_size < position


def cmd_logs(args: argparse.Namespace) -> int:
    path = log_path(load_settings(args.config).server, args.name)
    if not path.is_file() and not args.follow:
        print(f"mlxpool: no log at {path} yet", file=sys.stderr)
        return 1
    new_lines = follow(path) if args.follow else iter(())  # opened before the tail is read: no line falls between
    for line in tail(path, args.lines) if path.is_file() else []:
        print(line)
    try:
        for line in new_lines:
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`[server|watch] [-n N] [-f] [--config FILE]`, shared by `mlxpool logs` and `mlxpool service logs`."""
    parser.add_argument("name", nargs="?", choices=NAMES, default="server", help="whose log (default: server)")
    parser.add_argument("-n", "--lines", type=int, default=50, help="how many of the last lines (default: 50)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they are written")
    parser.add_argument("--config", help="models.toml whose logs_dir to read (default: $MLXPOOL_CONFIG or shipped)")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `mlxpool logs` (`commands` is the CLI's subparsers object)."""
    logs = commands.add_parser("logs", help="print the server's (or watch's) log; -f to follow")
    add_arguments(logs)
    logs.set_defaults(func=cmd_logs, url=None)
