"""The inbox folder: which files to take, when a file is complete, and file moves that never overwrite."""

from __future__ import annotations

import errno
import filecmp
import itertools
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from stat import S_ISREG

AUDIO_SUFFIXES = frozenset(
    {".aac", ".aif", ".aiff", ".amr", ".caf", ".flac", ".m4a", ".mka", ".mkv", ".mov", ".mp2", ".mp3", ".mp4"}
    | {".mpeg", ".mpga", ".oga", ".ogg", ".opus", ".wav", ".webm", ".wma"}
)
"""Files the daemon takes (what FFmpeg decodes); anything else in the folder is left alone."""


def is_audio(path: Path) -> bool:
    """A supported audio file; hidden names (editors' and rsync's temporary files) are not taken."""
    return not path.name.startswith((".", "~")) and path.suffix.lower() in AUDIO_SUFFIXES


def inbox(folder: Path) -> list[Path]:
    """The audio files waiting in `folder` (not its subfolders), oldest first."""
    found = [Path(e.path) for e in os.scandir(folder) if e.is_file() and is_audio(Path(e.name))]
    return sorted(found, key=_mtime)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Settler:
    """Candidate files become ready once their size and mtime stay unchanged for `settle` seconds.

    A file still being copied in keeps changing; one a writer has finished (closed) stays the same.
    """

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic):
        self.settle = settle
        self.clock = clock
        self._seen: dict[Path, tuple[tuple[int, int], float]] = {}

    @property
    def pending(self) -> bool:
        return bool(self._seen)

    def see(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if path not in self._seen and is_audio(path):
                self._seen[path] = ((-1, -1), self.clock())

    def ready(self) -> list[Path]:
        """The candidates that have settled (no longer candidates), in the order they were seen."""
        now, done = self.clock(), []
        for path, (last, since) in list(self._seen.items()):
            try:
                stat = path.stat()
            except FileNotFoundError:
                del self._seen[path]
                continue
            if not S_ISREG(stat.st_mode):
                del self._seen[path]
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if signature != last:
                self._seen[path] = (signature, now)
            elif now - since >= self.settle:
                del self._seen[path]
                done.append(path)
        return done


def changes(folder: Path, tick: float, poll: bool) -> Generator[set[Path]]:
    """Paths added or modified in `folder` (not its subfolders); an empty set every `tick` seconds when quiet."""
    import watchfiles

    batches = watchfiles.watch(
        folder,
        watch_filter=None,
        recursive=False,
        debounce=int(tick * 1000),
        rust_timeout=int(tick * 1000),
        yield_on_timeout=True,
        force_polling=poll,
    )
    for batch in batches:
        yield {Path(path) for change, path in batch if change != watchfiles.Change.deleted}


def write_atomic(path: Path, text: str) -> None:
    """Write `path` under a temporary name, then rename: a reader (or a restart) never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a power cut, not just a kill, cannot undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_stem(folder: Path, stem: str, endings: Iterable[str]) -> str:
    """`stem`, else `stem-2`, `stem-3`...: the first for which no `folder/stem+ending` exists."""
    endings = list(endings)
    for n in itertools.count(1):
        candidate = stem if n == 1 else f"{stem}-{n}"
        if not any(os.path.lexists(folder / (candidate + e)) for e in endings):
            return candidate
    raise AssertionError("unreachable")


def move_without_overwrite(source: Path, target: Path) -> None:
    """Move `source` to `target`; FileExistsError if `target` is some other file, which is left untouched.

    Safe to repeat after a crash: a move that was cut short (both names present, same file) is finished.
    """
    if os.path.lexists(target):
        if not _same_file(source, target):
            raise FileExistsError(f"{target} exists")
        source.unlink()
        return
    try:
        os.link(source, target, follow_symlinks=False)  # fails if target exists: never overwrites
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem, or another device
        _move_without_link(source, target)
    else:
        source.unlink()
    sync_dir(target.parent)


def _move_without_link(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)  # the check in the caller stands in for an exclusive rename
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copy2(source, temporary)
        os.rename(temporary, target)
        source.unlink()


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.lstat(), b.lstat()
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or filecmp.cmp(a, b, shallow=False)
