"""A fake Hugging Face Hub for tests: in-memory repos served over real HTTP on 127.0.0.1, in a background thread.

It answers what huggingface_hub 2.4.0 asks when it downloads:
  GET       /api/models/{repo}[/revision/{rev}]      repo_info/model_info: id, sha, siblings (+ size with ?blobs=)
  GET       /api/models/{repo}/tree/{rev}[/{path}]   list_repo_tree (snapshot_download's file list), one page
  HEAD, GET /{repo}/resolve/{rev}/{filename}         X-Repo-Commit, ETag (quoted sha256), Content-Length,
                                                     Accept-Ranges; GET honours `Range: bytes=a-b` with a 206
Errors carry X-Error-Code like the hub's, which hf_raise_for_status maps to exceptions: RepoNotFound,
RevisionNotFound and EntryNotFound (404), GatedRepo (401 without a token, 403 with a wrong one). It never sends
X-Xet-Hash / X-Xet-Refresh-Route / a `xet-auth` link nor `xetHash` in the tree, so huggingface_hub never tries Xet.

huggingface_hub reads its environment once, at import, so a test cannot just set HF_ENDPOINT or HF_HUB_CACHE:
`use_fake_hub(monkeypatch, hub, cache_dir)` patches the values it copied (see there). `go_offline` does the same
for HF_HUB_OFFLINE. Typical use:

    with FakeHub({"org/model": {"config.json": b"{}"}}) as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hub")
        snapshot_download("org/model")
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_INFO = re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
_TREE = re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Request(NamedTuple):
    method: str
    path: str  # unquoted, without the query
    range: str | None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeHub:
    """Serves `repos` ({repo_id: {filename: bytes}}) at commit COMMIT, branch "main".

    `gated` repos need `Authorization: Bearer <token>`. `cut_after[filename] = n` makes the next GET of that file
    stop after byte n of the file (with the full length announced) and close the connection; `cut_times[filename]`
    makes the cut apply to that many GETs instead of one. `requests` logs every request.
    """

    def __init__(
        self, repos: Mapping[str, Mapping[str, bytes]], *, gated: Iterable[str] = (), token: str | None = None
    ) -> None:
        self.repos = {repo: dict(files) for repo, files in repos.items()}
        self.gated = set(gated)
        self.token = token
        self.commit = COMMIT
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}
        self.cut_times: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._server = _Server(("127.0.0.1", 0), partial(_Handler, self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def file_gets(self, filename: str) -> list[str | None]:
        """The Range header (or None) of each GET of `filename` (from any repo, at any revision), in order."""
        with self._lock:
            return [
                r.range
                for r in self.requests
                if r.method == "GET" and (m := _RESOLVE.fullmatch(r.path)) is not None and m["file"] == filename
            ]

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_cut(self, filename: str) -> int | None:
        with self._lock:
            if filename not in self.cut_after:
                return None
            cut = self.cut_after[filename]
            self.cut_times[filename] = self.cut_times.get(filename, 1) - 1
            if self.cut_times[filename] <= 0:
                del self.cut_after[filename], self.cut_times[filename]
            return cut

    def files(self, repo: str, rev: str, authorization: str | None) -> dict[str, bytes]:
        """The repo's files, or the HubError the real hub would answer."""
        if repo not in self.repos:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if repo in self.gated and (self.token is None or authorization != f"Bearer {self.token}"):
            status = 401 if authorization is None else 403
            raise HubError(status, "GatedRepo", f"Access to model {repo} is restricted.")
        if rev not in ("main", self.commit):
            raise HubError(404, "RevisionNotFound", "Invalid rev id")
        return self.repos[repo]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of `Range: bytes=a-b|a-|-n`, clamped to the file; None when unsatisfiable."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:
        return max(size - int(last), 0), size - 1
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    return (start, end) if start <= end else None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hangs up early is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, hub: FakeHub, *args: Any) -> None:
        self.hub = hub
        super().__init__(*args)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_GET(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.log(Request(self.command, unquote(url.path), self.headers.get("Range")))
        self.close_connection = True  # one request per connection: stop() never waits on an idle keep-alive
        try:
            if (m := _INFO.fullmatch(url.path)) and self.command == "GET":
                self.repo_info(m["repo"], unquote(m["rev"] or "main"), "blobs" in parse_qs(url.query))
            elif (m := _TREE.fullmatch(url.path)) and self.command == "GET":
                self.tree(m["repo"], unquote(m["rev"]), unquote(m["path"] or ""))
            elif m := _RESOLVE.fullmatch(url.path):
                self.resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]))
            else:
                raise HubError(404, None, "Not found")
        except HubError as e:
            self.send(e.status, json.dumps({"error": e.message}).encode(), self.error_headers(e))

    def error_headers(self, error: HubError) -> dict[str, str]:
        headers = {"X-Error-Message": error.message, "Content-Type": "application/json"}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        if error.code == "EntryNotFound":
            headers["X-Repo-Commit"] = self.hub.commit
        return headers

    def repo_info(self, repo: str, rev: str, blobs: bool) -> None:
        files = self.hub.files(repo, rev, self.headers.get("Authorization"))
        siblings = [
            {"rfilename": name, **({"size": len(data), "blobId": _git_oid(data)} if blobs else {})}
            for name, data in files.items()
        ]
        info = {"id": repo, "modelId": repo, "sha": self.hub.commit, "private": False,
                "gated": "manual" if repo in self.hub.gated else False, "siblings": siblings}  # fmt: skip
        self.send_json(info)

    def tree(self, repo: str, rev: str, path: str) -> None:
        files = self.hub.files(repo, rev, self.headers.get("Authorization"))
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            for name, data in files.items()
            if name.startswith(prefix)
        ]
        self.send_json(entries)

    def resolve(self, repo: str, rev: str, filename: str) -> None:
        data = self.hub.files(repo, rev, self.headers.get("Authorization")).get(filename)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{filename} does not exist on {rev}")
        headers = {"X-Repo-Commit": self.hub.commit, "ETag": f'"{_sha256(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if self.command == "HEAD":
            self.send(200, data, headers)
            return
        status, first, last = 200, 0, len(data) - 1
        if (requested := self.headers.get("Range")) is not None:
            span = _byte_range(requested, len(data))
            if span is None:
                self.send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
                return
            (first, last), status = span, 206
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        cut = self.hub.take_cut(filename)
        end = last + 1 if cut is None else max(first, min(last + 1, cut))
        self.send(status, data[first : last + 1], headers, body=data[first:end])

    def send_json(self, value: object) -> None:
        self.send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def send(self, status: int, content: bytes, headers: Mapping[str, str], body: bytes | None = None) -> None:
        """Announce `content` and write `body` (default: the content; shorter to cut the transfer short)."""
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(content)), "Connection": "close"}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content if body is None else body)


def use_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, cache_dir: Path) -> None:
    """Point huggingface_hub at `hub` and `cache_dir`, with no token, until the test ends.

    huggingface_hub copies its environment at import, so this patches the copies: constants.ENDPOINT and
    HUGGINGFACE_CO_URL_TEMPLATE (hf_hub_download, snapshot_download, new HfApi()), hf_api.api.endpoint (the
    module-level get_safetensors_metadata, model_info, ... are methods of an HfApi made at import),
    constants.HF_HUB_CACHE and utils._cache_manager.HF_HUB_CACHE (scan_cache_dir), constants.HF_TOKEN_PATH, and
    constants.HF_HUB_OFFLINE. It also fills utils._detect_agent's once-per-process registry, which huggingface_hub
    would otherwise fetch from {ENDPOINT}/api/agent-harnesses on the first request it builds headers for. The
    environment variables are set too, for subprocesses.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _detect_agent

    cache = str(cache_dir)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)  # else GET /api/agent-harnesses
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir.parent / "no-hf-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", cache)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for the rest of the test: every huggingface_hub request raises OfflineModeIsEnabled."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # is_offline_mode() reads it on each request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def fast_resume(monkeypatch: pytest.MonkeyPatch, chunk_size: int = 1024) -> None:
    """Make huggingface_hub resume a broken transfer at once, from the last `chunk_size` boundary it received.

    http_get sleeps 1 s before each retry, and only counts bytes that iter_bytes(DOWNLOAD_CHUNK_SIZE = 10 MiB)
    has yielded: without this, a file cut before 10 MiB is fetched again from byte 0, not resumed.
    """
    from huggingface_hub import constants, file_download

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk_size)
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda seconds: None))  # its only use of time
