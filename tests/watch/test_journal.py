from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlxpool.watch.folder import move_without_overwrite
from mlxpool.watch.journal import JOURNAL, FolderBusyError, Journal, Record


def drop(folder: Path, name: str, data: bytes = b"audio") -> Path:
    (folder / name).write_bytes(data)
    return folder / name


def test_claim_moves_the_file_into_its_own_job(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with journal.locked():
        job = journal.claim(drop(tmp_path, "talk.wav"))
    assert job is not None and not (tmp_path / "talk.wav").exists()
    assert job.audio.read_bytes() == b"audio" and job.path.parent == tmp_path / ".mlxpool" / "work"
    assert Record.model_validate_json((job.path / JOURNAL).read_text()) == Record(name="talk.wav")
    assert (job.raw.name, job.corrected.name, job.error_file.name) == (
        "talk_raw.md",
        "talk_corrected.md",
        "talk.error.txt",
    )


def test_a_file_gone_before_its_claim_leaves_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with journal.locked():
        assert journal.claim(tmp_path / "gone.wav") is None
    assert os.listdir(journal.work) == []


def test_unfinished_keeps_real_jobs_oldest_first_and_clears_cut_claims(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with journal.locked():
        first = journal.claim(drop(tmp_path, "first.wav"))
        second = journal.claim(drop(tmp_path, "second.wav"))
        (journal.work / "00000000000000000001").mkdir()  # killed right after the job's mkdir
        cut = journal.work / "00000000000000000002"
        cut.mkdir()
        (cut / JOURNAL).write_text(Record(name="still-in-inbox.wav").model_dump_json())  # before its rename
        (cut / ".job.json.tmp").write_text("half")
        jobs = journal.unfinished()
    assert first is not None and second is not None
    assert [j.path for j in jobs] == [first.path, second.path]
    assert sorted(os.listdir(journal.work)) == sorted([first.path.name, second.path.name])


def test_archive_picks_a_free_name_and_resumes_under_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    done = tmp_path / "done"
    done.mkdir()
    (done / "talk.wav").write_bytes(b"older recording")
    with journal.locked():
        job = journal.claim(drop(tmp_path, "talk.wav"))
        assert job is not None
        job.raw.write_text("raw")
        job.corrected.write_text("corrected")
        moves: list[Path] = []

        def killed_after_one(source: Path, target: Path) -> None:
            if moves:
                raise KeyboardInterrupt  # stands in for a kill
            moves.append(target)
            move_without_overwrite(source, target)

        monkeypatch.setattr("mlxpool.watch.journal.move_without_overwrite", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            journal.archive(job, "done")
        monkeypatch.undo()
        assert moves == [done / "talk-2_corrected.md"]  # outputs first, the audio last
        # Meanwhile a file takes a name the journal reserved: that output gets the next free name instead.
        (done / "talk-2_raw.md").write_text("someone else's")
        [resumed] = journal.unfinished()
        assert resumed.record.archive_stem == "talk-2"
        assert journal.archive(resumed, "done") == "talk-2"
    assert sorted(os.listdir(done)) == [
        "talk-2.wav",
        "talk-2_corrected.md",
        "talk-2_raw.md",
        "talk-3_raw.md",
        "talk.wav",
    ]
    assert (done / "talk.wav").read_bytes() == b"older recording"
    assert (done / "talk-2_raw.md").read_text() == "someone else's"
    assert (done / "talk-3_raw.md").read_text() == "raw"
    assert os.listdir(journal.work) == []


def test_one_daemon_per_folder(tmp_path: Path) -> None:
    busy = pytest.raises(FolderBusyError, match="another `mlxpool watch` is running on")
    with Journal(tmp_path).locked(), busy, Journal(tmp_path).locked():
        pass
    with Journal(tmp_path).locked():  # released with its holder
        pass
