"""The watch loop: finish the jobs a previous run left, take the files waiting, then each new file once it has
settled. Per file: transcribe, write `NAME_raw.md`, correct, write `NAME_corrected.md`, archive to done/ (or,
on failure, to failed/ with `NAME.error.txt`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mlxpool.watch import outputs, pipeline
from mlxpool.watch.chunks import chunk_text
from mlxpool.watch.client import ServerAuthError, ServerClient, ServerError, ServerUnreachableError
from mlxpool.watch.folder import Settler, changes, inbox, write_atomic
from mlxpool.watch.journal import Job, Journal

log = logging.getLogger("mlxpool.watch")


@dataclass(frozen=True)
class WatchSettings:
    """How the folder is watched; the CLI fills it from flags."""

    folder: Path
    settle: float = 2.0
    """Seconds a file's size and mtime must stay unchanged before it is taken."""
    tick: float = 0.5
    """Seconds between checks of files still settling."""
    poll: bool = False
    """Poll the folder instead of OS events (network filesystems)."""
    once: bool = False
    """Process what is waiting, then exit."""


class Daemon:
    """One folder's watcher: its journal, its settling files, and the server it sends them to."""

    def __init__(self, settings: WatchSettings, client: ServerClient, options: pipeline.Options):
        self.settings = settings
        self.client = client
        self.options = options
        self.journal = Journal(settings.folder)
        self.settler = Settler(settings.settle)

    def run(self) -> None:
        """Watch until stopped (or, with `once`, until nothing is waiting). FolderBusyError if another runs."""
        with self.journal.locked():
            for job in self.journal.unfinished():
                log.info("%s: resuming an unfinished job", job.record.name)
                self.process(job)
            self.settler.see(inbox(self.settings.folder))
            if self.settings.once:
                self._drain()
            else:
                self._watch()

    def _watch(self) -> None:
        log.info("watching %s", self.settings.folder)
        for changed in changes(self.settings.folder, self.settings.tick, self.settings.poll):
            self.settler.see(changed)
            self._take_ready()

    def _drain(self) -> None:
        while self.settler.pending:
            self._take_ready()
            time.sleep(self.settings.tick)
        self._take_ready()

    def _take_ready(self) -> None:
        for path in self.settler.ready():
            job = self.journal.claim(path)
            if job is not None:
                self.process(job)

    def process(self, job: Job) -> None:
        """Take `job` through whatever steps its journal does not show as done, then archive it."""
        record = job.record
        if record.archive_to is None and record.error is None:
            try:
                self._transcribe(job)
                self._correct(job)
            except (ServerUnreachableError, ServerAuthError):
                raise  # not this file's fault: stop, and leave the job for the next run
            except ServerError as exc:
                self._fail(job, str(exc))
            except Exception as exc:  # whatever it is, it is this file's problem: the daemon goes on
                log.exception("%s: unexpected error", record.name)
                self._fail(job, f"{type(exc).__name__}: {exc}")
        if record.error is not None and record.archive_to is None and not job.error_file.exists():
            retry = f"To try again, move the audio file from failed/ back into {self.settings.folder}."
            write_atomic(job.error_file, f"{record.name}: {record.error}\n{retry}\n")
        to = record.archive_to or ("failed" if record.error is not None else "done")
        stem = self.journal.archive(job, to)
        log.info("%s: archived to %s/%s", record.name, to, stem + Path(record.name).suffix)

    def _transcribe(self, job: Job) -> None:
        if job.record.transcription is None:
            heard = pipeline.transcribe(self.client, job.audio, self.options)
            job.record.transcription = heard.model_copy(update={"segments": []})  # the journal needs no timings
            job.record.date = outputs.now()
            job.save()
        t = job.record.transcription
        if not job.raw.exists():
            write_atomic(job.raw, outputs.raw_markdown(job.record.name, t, job.record.date or outputs.now()))
            log.info("%s: transcribed %.1f s (%s) with %s", job.record.name, t.duration, t.language, t.model)

    def _correct(self, job: Job) -> None:
        t = job.record.transcription
        assert t is not None
        if job.record.chunks is None:
            job.record.chunks = chunk_text(t.text, self.options.chunk_chars)
            job.save()
        while len(job.record.corrected) < len(job.record.chunks):
            piece = job.record.chunks[len(job.record.corrected)]
            text, job.record.corrected_by = pipeline.correct_piece(self.client, piece, self.options)
            job.record.corrected.append(text)
            job.save()
        if not job.corrected.exists():
            by = job.record.corrected_by or self.options.llm_model
            text = " ".join(job.record.corrected)
            write_atomic(job.corrected, outputs.corrected_markdown(job.record.name, t, text, by, job.record.date or ""))
            log.info("%s: corrected in %d piece(s) with %s", job.record.name, len(job.record.chunks), by)

    def _fail(self, job: Job, error: str) -> None:
        log.error("%s: failed: %s", job.record.name, error)
        job.record.error = error
        job.save()
