"""Crash safety. A file is claimed by renaming it into its own job folder (`.mlxpool/work/ID/`), whose small
journal (`job.json`, rewritten atomically) records each step's result. Outputs are written under temporary
names and renamed. After a kill at any moment, a restart finds every claimed file in `work/` and carries on
from its journal: nothing is lost, nothing done twice, no half-written output passes for a whole one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from mlxpool.watch.folder import free_stem, move_without_overwrite, sync_dir, write_atomic
from mlxpool.watch.pipeline import Transcription

log = logging.getLogger("mlxpool.watch")

STATE_DIR = ".mlxpool"
JOURNAL = "job.json"


class FolderBusyError(Exception):
    """Another daemon is watching this folder."""


class Record(BaseModel):
    """What a job has done so far."""

    name: str
    """The audio file's name as it was dropped."""
    transcription: Transcription | None = None
    date: str | None = None
    """When it was transcribed (the outputs' header)."""
    chunks: list[str] | None = None
    """The transcript cut into pieces for correction."""
    corrected: list[str] = []
    """The corrected pieces so far (a restart goes on from the next one)."""
    corrected_by: str | None = None
    error: str | None = None
    archive_to: str | None = None
    """`done` or `failed` once the job is being archived."""
    archive_stem: str | None = None
    """The free name chosen there (`talk`, or `talk-2` when `talk` is taken)."""


class Job:
    """One claimed audio file: its folder and its journal."""

    def __init__(self, path: Path, record: Record):
        self.path = path
        self.record = record

    @property
    def stem(self) -> str:
        return Path(self.record.name).stem

    @property
    def audio(self) -> Path:
        return self.path / self.record.name

    @property
    def raw(self) -> Path:
        return self.path / f"{self.stem}_raw.md"

    @property
    def corrected(self) -> Path:
        return self.path / f"{self.stem}_corrected.md"

    @property
    def error_file(self) -> Path:
        return self.path / f"{self.stem}.error.txt"

    @property
    def endings(self) -> list[str]:
        """What follows the stem in the names of the job's files (`.wav`, `_raw.md`...)."""
        return [Path(self.record.name).suffix, "_raw.md", "_corrected.md", ".error.txt"]

    def save(self) -> None:
        write_atomic(self.path / JOURNAL, self.record.model_dump_json(indent=1))

    def files(self) -> list[Path]:
        """The outputs, then the audio, in the job folder (not the journal, not temporary files): archived in
        this order, an audio file in done/ has its outputs beside it."""
        found = (p for p in self.path.iterdir() if p.name != JOURNAL and not p.name.startswith("."))
        return sorted(found, key=lambda p: (p.name == self.record.name, p.name))


class Journal:
    """The jobs of one watched folder, under `FOLDER/.mlxpool/work/`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.work = folder / STATE_DIR / "work"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock: one daemon per folder. The kernel drops it when the process dies."""
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work.parent / "lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusyError(f"another `mlxpool watch` is running on {self.folder}") from None
            yield

    def claim(self, audio: Path) -> Job | None:
        """Move `audio` into a new job; None if it went away first."""
        job = Job(self._new_job_dir(), Record(name=audio.name))
        job.save()
        try:
            os.rename(audio, job.audio)
        except FileNotFoundError:
            self._discard(job.path)
            return None
        sync_dir(audio.parent)
        sync_dir(job.path)
        return job

    def _new_job_dir(self) -> Path:
        while True:
            path = self.work / f"{time.time_ns():020d}"
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                return path

    def unfinished(self) -> list[Job]:
        """The jobs a previous run left, oldest first; leftovers of claims cut short are cleared away."""
        jobs = []
        for path in sorted(p for p in self.work.iterdir() if p.is_dir()):
            try:
                record = Record.model_validate_json((path / JOURNAL).read_bytes())
            except FileNotFoundError:  # killed before its journal was written, or after its archive
                self._discard(path)
                continue
            except ValidationError as exc:
                log.error("%s: unreadable journal, left as it is: %s", path, exc)
                continue
            job = Job(path, record)
            if record.archive_to is None and not job.audio.exists():  # killed before the claim's rename
                self._discard(path)
                continue
            jobs.append(job)
        return jobs

    def archive(self, job: Job, to: str) -> str:
        """Move the job's files into FOLDER/`to` under a free name, never overwriting; returns that name."""
        target = self.folder / to
        target.mkdir(exist_ok=True)
        if job.record.archive_to != to or job.record.archive_stem is None:
            job.record.archive_to, job.record.archive_stem = to, free_stem(target, job.stem, job.endings)
            job.save()
        stem = job.record.archive_stem
        for file in job.files():
            ending = file.name[len(job.stem) :]
            try:
                move_without_overwrite(file, target / (stem + ending))
            except FileExistsError:  # taken since the name was chosen: this file gets the next free name
                move_without_overwrite(file, target / (free_stem(target, job.stem, job.endings) + ending))
        self._discard(job.path)
        return stem

    def _discard(self, path: Path) -> None:
        """Remove a job folder that holds nothing but its journal and temporary files."""
        for leftover in path.iterdir():
            if leftover.name == JOURNAL or leftover.name.startswith("."):
                leftover.unlink()
        try:
            path.rmdir()
        except OSError:
            log.error("%s: unexpected files left in a finished job: %s", path, sorted(os.listdir(path)))
