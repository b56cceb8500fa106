"""Fetching a model's files from the Hugging Face hub, with progress, disk checks and distinct errors.

Everything here blocks (HTTP, disk): the pool runs it in a thread, the CLI calls it directly. huggingface_hub
does the transfer and its cache conventions (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).
Files are fetched one by one, so an interrupted download keeps every file it finished and the next attempt
fetches only the rest; within a file, huggingface_hub 2.x retries a dropped connection itself, resuming from the
last 10 MiB chunk it received. A file appears in the snapshot only when whole.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from mlxpool.config import ModelSpec, human_bytes
from mlxpool.errors import DiskFullError, HubAuthError, HubUnreachableError, MlxpoolError, RepoNotFoundError

# The files backends read; repos often also hold PyTorch/GGUF/ONNX copies we never need.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py", "voices/*"]
COMPLETE = ".mlxpool-complete"
"""Written into a snapshot once every planned file is in it: a snapshot without it is not loaded."""
DISK_MARGIN = 512 * 2**20


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx2 since 2.x, httpx before)."""
    errors: list[type[BaseException]] = [httpx.TransportError, ConnectionError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


@dataclass
class FilePlan:
    name: str
    size: int
    cached: bool


@dataclass
class DownloadPlan:
    repo: str
    commit: str
    files: list[FilePlan]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> int:
        return sum(f.size for f in self.files if not f.cached)


@dataclass
class Progress:
    """Bytes done of a download; written by the download thread, read by the loop and the CLI."""

    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    resumed_from: int = 0
    on_update: Callable[[int], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self.on_update is not None:
            self.on_update(n)

    @property
    def rate(self) -> float:
        """Bytes per second fetched in this run."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.resumed_from) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def line(self) -> str:
        """`45% 1.2/2.7 GB 35 MB/s eta 40s`"""
        percent = 100 * self.done / self.total if self.total else 0
        eta = "?" if self.eta is None else f"{self.eta:.0f}s"
        return f"{percent:.0f}% {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB {self.rate / 1e6:.0f} MB/s eta {eta}"

    def as_dict(self) -> dict[str, Any]:
        return {"done_bytes": self.done, "total_bytes": self.total, "bytes_per_second": round(self.rate),
                "eta_seconds": None if self.eta is None else round(self.eta, 1)}  # fmt: skip


def snapshot_dir(spec: ModelSpec) -> Path | None:
    """The model's complete snapshot in the local cache, or None (blocking; no network)."""
    try:
        path = Path(snapshot_download(str(spec.repo), revision=spec.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        return None
    # Offline, trust whatever the cache holds: it holds no partial files (blobs are renamed when whole).
    return path if (path / COMPLETE).exists() or constants.HF_HUB_OFFLINE else None


def has_partial(spec: ModelSpec) -> bool:
    """Whether some of the model's files are in the cache already (an interrupted or unfinished download)."""
    folder = Path(constants.HF_HUB_CACHE) / f"models--{str(spec.repo).replace('/', '--')}"
    return folder.is_dir() and any(folder.glob("blobs/*"))


def plan(spec: ModelSpec) -> DownloadPlan:
    """Which of the model's files exist, how big, and which are already cached (asks the hub)."""
    with hub_errors(spec):
        infos = snapshot_download(str(spec.repo), revision=spec.revision, allow_patterns=MODEL_FILES, dry_run=True)
    files = [FilePlan(i.filename, i.file_size or 0, i.is_cached) for i in infos]
    commit = infos[0].commit_hash if infos else str(spec.revision or "main")
    return DownloadPlan(str(spec.repo), commit, sorted(files, key=lambda f: f.name))


def download(spec: ModelSpec, progress: Progress | None = None, the_plan: DownloadPlan | None = None) -> Path:
    """Fetch every missing file of the model (resuming partial ones), then mark the snapshot complete."""
    todo = the_plan or plan(spec)
    progress = progress or Progress()
    progress.total = todo.total
    progress.done = progress.resumed_from = todo.total - todo.missing
    check_disk(spec, todo)
    if not todo.files:
        raise RepoNotFoundError(f"repo {todo.repo!r} has no model files (looked for {', '.join(MODEL_FILES)})")
    reporter = _reporter(progress)
    with hub_errors(spec):
        for file in todo.files:
            if not file.cached:
                hf_hub_download(todo.repo, file.name, revision=todo.commit, tqdm_class=reporter)
        path = Path(snapshot_download(todo.repo, revision=todo.commit, local_files_only=True))
    (path / COMPLETE).write_text(f"{todo.commit}\n")
    return path


def check_disk(spec: ModelSpec, todo: DownloadPlan) -> None:
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if todo.missing + DISK_MARGIN > free:
        raise DiskFullError(
            f"not enough disk for model {spec.name!r}: it needs {human_bytes(todo.missing)} more (plus "
            f"{human_bytes(DISK_MARGIN)} spare) in {cache}, which has {human_bytes(free)} free",
            retry_after=300,
        )


@contextlib.contextmanager
def hub_errors(spec: ModelSpec) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's errors into mlxpool's, one distinct error per cause."""
    try:
        yield
    except MlxpoolError:
        raise
    except Exception as exc:
        error = _translate(spec, exc)
        if error is None:
            raise
        raise error from exc


def _translate(spec: ModelSpec, exc: BaseException) -> MlxpoolError | None:
    # A dry run wraps the hub's error (DryRunError from RepositoryNotFoundError...): look down the chain.
    while isinstance(exc, DryRunError) and exc.__cause__ is not None:
        exc = exc.__cause__
    repo = f"repo {spec.repo!r} (model {spec.name!r})"
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403)
    ):
        return HubAuthError(
            f"{repo} is gated or needs authorization: accept its terms on the hub and set HF_TOKEN for the server",
            retry_after=300,
        )
    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
        return RepoNotFoundError(f"{repo} was not found on the hub ({constants.ENDPOINT})", param="model")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError, *TRANSPORT_ERRORS)):
        return HubUnreachableError(
            f"cannot download {repo}: the hub ({constants.ENDPOINT}) is unreachable or HF_HUB_OFFLINE is set "
            f"({type(exc).__name__}: {exc})",
            retry_after=30,
        )
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return DiskFullError(f"the disk filled up while downloading {repo}: {exc}", retry_after=300)
    return None


def _reporter(progress: Progress) -> type[tqdm]:
    """A tqdm class that forwards byte counts to `progress` and prints nothing."""

    class Reporter(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            progress.add(int(n or 0))
            return None

    return Reporter
