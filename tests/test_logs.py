"""Log files: what goes to the file and to stderr, rotation, and `mlxpool logs` (tail and follow)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxpool import logs
from mlxpool.cli import main
from mlxpool.config import ServerSettings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger back as pytest had it (configure() adds handlers and sets levels)."""
    root, access = logging.getLogger(), logging.getLogger(logs.ACCESS_LOGGER)
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    access.setLevel(access_level)


def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **server: object) -> tuple[Path, io.StringIO]:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    path = logs.configure(ServerSettings.model_validate({"logs_dir": str(tmp_path / "logs"), **server}))
    return path, stderr


def written(path: Path) -> str:
    """The file's text once the records logged so far are in it (the file handler writes from a thread)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text()


@pytest.mark.usefixtures("restore_logging")
def test_the_file_gets_requests_and_lifecycle_stderr_only_lifecycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, stderr = configured(tmp_path, monkeypatch)
    assert path == tmp_path / "logs" / "server.log"
    logging.getLogger("mlxpool.pool.pool").info("loaded demo-chat in 0.1 s, 1.0 MiB")
    logging.getLogger(logs.ACCESS_LOGGER).info("POST /v1/embeddings model=e status=200 ms=3.1 tokens=9")
    logging.getLogger("mlxpool.pool.pool").debug("not at info")
    lines = written(path).splitlines()
    assert [line.split(" ", 3)[2:] for line in lines] == [
        ["INFO", "mlxpool.pool.pool: loaded demo-chat in 0.1 s, 1.0 MiB"],
        ["INFO", "mlxpool.access: POST /v1/embeddings model=e status=200 ms=3.1 tokens=9"],
    ]
    assert "loaded demo-chat" in stderr.getvalue() and "POST" not in stderr.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_requests_are_logged_whatever_the_level_and_on_stderr_at_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = configured(tmp_path, monkeypatch, log_level="warning")
    logging.getLogger(logs.ACCESS_LOGGER).info("GET /health model=- status=200 ms=0.1 tokens=-")
    logging.getLogger("mlxpool.pool.pool").info("below warning")
    assert "GET /health" in written(path) and "below warning" not in written(path)
    _, stderr = configured(tmp_path, monkeypatch, log_level="debug")
    logging.getLogger(logs.ACCESS_LOGGER).info("GET /v1/models model=- status=200 ms=0.1 tokens=-")
    assert "GET /v1/models" in stderr.getvalue()
    assert len([h for h in logging.getLogger().handlers if h.get_name() in logs.HANDLERS]) == 2  # replaced


@pytest.mark.usefixtures("restore_logging")
def test_the_file_rotates_at_its_size_keeping_its_backups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = configured(tmp_path, monkeypatch, log_max_bytes="2KB", log_backups=2)
    for i in range(100):
        logging.getLogger(logs.ACCESS_LOGGER).info("request %03d %s", i, "x" * 40)
    written(path)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())
    assert logs.tail(path, 1)[0].endswith("request 099 " + "x" * 40)


def write(path: Path, lines: list[str]) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_file_lines_are_written_by_a_thread_of_their_own_and_close_writes_the_rest() -> None:
    seen: list[tuple[int, str]] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((threading.get_ident(), record.getMessage()))

    handler = logs.InBackground(Recording())
    logger = logging.getLogger("mlxpool.test.background")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(200):
            logger.warning("line %d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert [message for _, message in seen] == [f"line {i}" for i in range(200)]
    assert threading.get_ident() not in {thread for thread, _ in seen}


def test_tail_reads_back_into_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    write(path.with_name("server.log.2"), ["a", "b"])
    write(path.with_name("server.log.1"), ["c", "d"])
    write(path, ["e"])
    assert logs.tail(path, 3) == ["c", "d", "e"]
    assert logs.tail(path, 50) == ["a", "b", "c", "d", "e"]
    assert logs.tail(path, 0) == []


def test_tail_of_a_long_file_reads_only_its_end(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    write(path, [f"line {i}" for i in range(20000)])
    assert logs.tail(path, 2) == ["line 19998", "line 19999"]
    assert logs._last_lines(path, 3, block=7) == ["line 19997", "line 19998", "line 19999"]


def test_follow_prints_new_lines_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    write(path, ["old"])
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) > 5:
            raise AssertionError("follow waited for a line that was written")

    lines = logs.follow(path, sleep=sleep)
    write(path, ["new 1"])
    assert next(lines) == "new 1"  # "old" was there before: not repeated
    with path.open("a") as f:
        f.write("half a ")
    naps.clear()
    write(path, ["line"])
    assert next(lines) == "half a line"
    path.rename(path.with_name("server.log.1"))  # the handler rotates
    write(path, ["after rotation"])
    assert next(lines) == "after rotation"


def test_follow_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "watch.log"
    waited: list[float] = []

    def sleep(seconds: float) -> None:
        waited.append(seconds)
        if len(waited) == 3:
            write(path, ["first"])

    assert next(logs.follow(path, sleep=sleep)) == "first"
    assert len(waited) == 3


def test_the_logs_command_prints_the_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLXPOOL_LOGS_DIR", str(tmp_path))
    write(tmp_path / "server.log", [f"line {i}" for i in range(60)])
    assert main(["logs"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"line {i}" for i in range(10, 60)]
    assert main(["logs", "server", "-n", "2"]) == 0
    assert capsys.readouterr().out == "line 58\nline 59\n"
    assert main(["service", "logs", "-n", "1"]) == 0
    assert capsys.readouterr().out == "line 59\n"
    assert main(["logs", "watch"]) == 1
    assert f"no log at {tmp_path / 'watch.log'}" in capsys.readouterr().err
