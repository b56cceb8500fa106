from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mlxpool.watch.folder import Settler, changes, free_stem, inbox, is_audio, move_without_overwrite, write_atomic


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("talk.wav", True),
        ("Call.M4A", True),
        ("memo.opus", True),
        ("notes.txt", False),
        ("talk.wav.part", False),
        ("talk.crdownload", False),
        (".talk.wav.Xy12", False),  # rsync's temporary name
        (".talk.wav", False),
        ("~talk.wav", False),
        ("noextension", False),
    ],
)
def test_is_audio(name: str, taken: bool) -> None:
    assert is_audio(Path(name)) is taken


def test_inbox_lists_audio_in_the_folder_itself_oldest_first(tmp_path: Path) -> None:
    for i, name in enumerate(["b.mp3", "a.wav", "notes.txt", ".hidden.wav"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "old.wav").write_bytes(b"x")
    (tmp_path / "folder.wav").mkdir()
    assert [p.name for p in inbox(tmp_path)] == ["b.mp3", "a.wav"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_file_is_ready_once_unchanged_for_the_settle_time(tmp_path: Path) -> None:
    clock = Clock()
    settler = Settler(2.0, clock)
    growing = tmp_path / "growing.wav"
    growing.write_bytes(b"x")
    settler.see([growing, tmp_path / "notes.txt"])
    assert settler.ready() == [] and settler.pending
    for second in range(1, 6):  # a writer adds to it every second: never settles
        clock.now = float(second)
        with open(growing, "ab") as file:
            file.write(b"more")
        assert settler.ready() == []
    clock.now = 6.9  # the last change was seen at 5.0
    assert settler.ready() == []
    clock.now = 7.0
    assert settler.ready() == [growing] and not settler.pending


def test_vanished_files_and_folders_are_dropped(tmp_path: Path) -> None:
    settler = Settler(0.0)
    gone, folder = tmp_path / "gone.wav", tmp_path / "dir.wav"
    folder.mkdir()
    settler.see([gone, folder])
    assert settler.ready() == [] and not settler.pending


def test_changes_reports_new_files_and_ticks_when_quiet(tmp_path: Path) -> None:
    batches = changes(tmp_path, tick=0.1, poll=False)
    started = time.monotonic()
    assert next(batches) == set() and time.monotonic() - started < 2
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.wav").write_bytes(b"x")
    (tmp_path / "new.wav").write_bytes(b"x")
    seen: set[Path] = set()
    deadline = time.monotonic() + 5
    while tmp_path / "new.wav" not in seen and time.monotonic() < deadline:
        seen |= next(batches)
    assert tmp_path / "new.wav" in seen and tmp_path / "sub" / "inner.wav" not in seen
    batches.close()


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.md"
    write_atomic(target, "first")
    write_atomic(target, "second")
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["out.md"]


def test_free_stem_skips_names_any_output_would_clash_with(tmp_path: Path) -> None:
    endings = [".wav", "_raw.md", "_corrected.md"]
    assert free_stem(tmp_path, "talk", endings) == "talk"
    (tmp_path / "talk_raw.md").write_text("x")
    (tmp_path / "talk-2.wav").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "talk-3_corrected.md")  # a dangling link still takes the name
    assert free_stem(tmp_path, "talk", endings) == "talk-4"


def test_move_never_overwrites(tmp_path: Path) -> None:
    source, target = tmp_path / "a.wav", tmp_path / "done.wav"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        move_without_overwrite(source, target)
    assert source.read_bytes() == b"new" and target.read_bytes() == b"old"
    other = tmp_path / "free.wav"
    move_without_overwrite(source, other)
    assert not source.exists() and other.read_bytes() == b"new"


def test_a_move_cut_short_is_finished_by_repeating_it(tmp_path: Path) -> None:
    source, target = tmp_path / "a.wav", tmp_path / "b.wav"
    source.write_bytes(b"data")
    os.link(source, target)  # killed between the link and the unlink
    move_without_overwrite(source, target)
    assert not source.exists() and target.read_bytes() == b"data"


@pytest.mark.parametrize("failure", [errno.EPERM, errno.EXDEV])
def test_moves_without_hard_links_or_across_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(failure, os.strerror(failure))

    real_rename = os.rename

    def rename(source: Any, target: Any) -> None:
        if failure == errno.EXDEV and not Path(source).name.startswith("."):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_rename(source, target)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "rename", rename)
    source, target = tmp_path / "a.wav", tmp_path / "b.wav"
    source.write_bytes(b"data")
    move_without_overwrite(source, target)
    assert sorted(os.listdir(tmp_path)) == ["b.wav"] and target.read_bytes() == b"data"
    source.write_bytes(b"other")
    with pytest.raises(FileExistsError):
        move_without_overwrite(source, target)
    assert target.read_bytes() == b"data"
