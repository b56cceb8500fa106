"""The fake hub answers huggingface_hub 2.4.0 the way the real hub does, for every call mlxpool makes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from mlxpool.pool.downloads import TRANSPORT_ERRORS
from tests.fakehub import COMMIT, FakeHub, Request, fast_resume, go_offline, use_fake_hub

REPO = "org/tiny"
CONFIG = b'{"model_type": "tiny"}'
WEIGHTS = bytes(range(256)) * 64  # 16 KiB
TOKENIZER = b'{"vocab": {}}'
FILES = {"config.json": CONFIG, "model.bin": WEIGHTS, "tokenizer/tokenizer.json": TOKENIZER, "README.md": b"# tiny"}


class Recorder(tqdm):  # type: ignore[misc]
    """A silent progress bar that remembers every bar made and every update."""

    bars: ClassVar[list[Recorder]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.updates: list[float] = []
        self.label = str(kwargs.get("desc", ""))
        self.initial_total = kwargs.get("total")
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        Recorder.bars.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        self.updates.append(n or 0)
        shown: bool | None = super().update(n)
        return shown


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub({REPO: FILES, "org/gated": {"config.json": CONFIG}}, gated={"org/gated"}, token="s3cret") as fake:
        use_fake_hub(monkeypatch, fake, tmp_path / "hub")
        yield fake


def blob_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_snapshot_download_fills_the_cache_layout(hub: FakeHub, tmp_path: Path) -> None:
    path = Path(snapshot_download(REPO, allow_patterns=["*.json", "*.bin"]))

    repo_dir = tmp_path / "hub" / "models--org--tiny"
    assert path == repo_dir / "snapshots" / COMMIT
    assert (path / "config.json").read_bytes() == CONFIG
    assert (path / "tokenizer" / "tokenizer.json").read_bytes() == TOKENIZER
    assert (path / "model.bin").resolve() == repo_dir / "blobs" / blob_name(WEIGHTS)
    assert not (path / "README.md").exists()
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    assert hub.requests[:2] == [("GET", f"/api/models/{REPO}/revision/main", None),
                                ("GET", f"/api/models/{REPO}/tree/{COMMIT}", None)]  # fmt: skip
    assert hub.file_gets("README.md") == []


def test_dry_run_lists_sizes_without_downloading(hub: FakeHub, tmp_path: Path) -> None:
    infos = snapshot_download(REPO, allow_patterns=["*.json", "*.bin"], dry_run=True)

    assert {i.filename: i.file_size for i in infos} == {n: len(d) for n, d in FILES.items() if n != "README.md"}
    assert all(i.commit_hash == COMMIT and i.will_download and not i.is_cached for i in infos)
    assert all(r.method != "GET" or "/resolve/" not in r.path for r in hub.requests)
    snapshot_download(REPO, allow_patterns=["config.json"])
    again = snapshot_download(REPO, allow_patterns=["*.json"], dry_run=True)
    assert {i.filename: i.is_cached for i in again} == {"config.json": True, "tokenizer/tokenizer.json": False}


def test_hf_hub_download_reports_bytes_to_tqdm_class(hub: FakeHub) -> None:
    Recorder.bars = []
    path = hf_hub_download(REPO, "model.bin", tqdm_class=Recorder)

    assert Path(path).read_bytes() == WEIGHTS
    [bar] = Recorder.bars
    assert bar.initial_total == len(WEIGHTS)
    assert sum(bar.updates) == len(WEIGHTS)
    assert [r.method for r in hub.requests] == ["HEAD", "GET"]


def test_snapshot_tqdm_class_sees_bytes_on_its_reconstruct_bar(hub: FakeHub) -> None:
    Recorder.bars = []
    snapshot_download(REPO, tqdm_class=Recorder)

    byte_bars = [b for b in Recorder.bars if b.label.startswith("Reconstructing")]
    assert [sum(b.updates) for b in byte_bars] == [sum(len(d) for d in FILES.values())]


def test_model_info_lists_siblings_with_sizes(hub: FakeHub) -> None:
    info = HfApi(endpoint=hub.url).model_info(REPO, files_metadata=True)

    assert info.id == REPO and info.sha == COMMIT
    assert {s.rfilename: s.size for s in info.siblings or []} == {n: len(d) for n, d in FILES.items()}
    plain = huggingface_hub.model_info(REPO)  # the module-level function: bound to an HfApi made at import
    assert {s.rfilename: s.size for s in plain.siblings or []} == dict.fromkeys(FILES)
    assert hub.requests[-1] == ("GET", f"/api/models/{REPO}", None)


def safetensors_file(names: list[str], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {name: np.arange(6, dtype=np.float16).reshape(2, 3) for name in names}
    return bytes(save_safetensors(tensors, metadata=metadata))


def test_safetensors_metadata_single_file_by_range(hub: FakeHub) -> None:
    hub.repos["org/st"] = {"model.safetensors": safetensors_file(["a", "b"])}
    metadata = get_safetensors_metadata("org/st")

    assert not metadata.sharded
    file = metadata.files_metadata["model.safetensors"]
    assert {n: (t.dtype, t.shape) for n, t in file.tensors.items()} == {"a": ("F16", [2, 3]), "b": ("F16", [2, 3])}
    assert file.parameter_count == {"F16": 12}
    assert hub.requests[-1] == ("GET", "/org/st/resolve/main/model.safetensors", "bytes=0-100000")


def test_safetensors_metadata_sharded_with_a_long_header(hub: FakeHub) -> None:
    long_header = safetensors_file(["b"], metadata={"notes": "x" * 150_000})
    index = {"metadata": {"total_size": 24}, "weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors"}}
    hub.repos["org/sharded"] = {"model.safetensors.index.json": json.dumps(index).encode(),
                                "s-1.safetensors": safetensors_file(["a"]), "s-2.safetensors": long_header}  # fmt: skip
    metadata = get_safetensors_metadata("org/sharded")

    assert metadata.sharded and metadata.metadata == {"total_size": 24}
    assert metadata.weight_map == index["weight_map"]
    assert metadata.files_metadata["s-2.safetensors"].metadata == {"notes": "x" * 150_000}
    header_length = int.from_bytes(long_header[:8], "little")
    assert hub.file_gets("s-2.safetensors") == ["bytes=0-100000", f"bytes=8-{header_length + 7}"]


def test_range_requests_get_206_and_clamped_ends(hub: FakeHub) -> None:
    url = f"{hub.url}/{REPO}/resolve/main/model.bin"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    past_end = httpx.get(url, headers={"Range": "bytes=16000-99999"})
    beyond = httpx.get(url, headers={"Range": "bytes=99999-"})

    assert (tail.status_code, tail.content) == (206, WEIGHTS[-10:])
    assert past_end.headers["Content-Range"] == f"bytes 16000-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
    assert past_end.content == WEIGHTS[16000:]
    assert beyond.status_code == 416


def test_head_carries_the_metadata_huggingface_hub_needs_and_nothing_of_xet(hub: FakeHub) -> None:
    response = httpx.head(f"{hub.url}/{REPO}/resolve/main/model.bin")

    assert response.headers["X-Repo-Commit"] == COMMIT
    assert response.headers["ETag"] == f'"{blob_name(WEIGHTS)}"'
    assert response.headers["Content-Length"] == str(len(WEIGHTS))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert not any(name.lower().startswith("x-xet") for name in response.headers)
    assert "link" not in response.headers


def test_unknown_repo_and_file_raise_not_found(hub: FakeHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "nope.json")


def test_dry_run_wraps_repo_errors_in_dry_run_error(hub: FakeHub) -> None:
    with pytest.raises(DryRunError) as missing:
        snapshot_download("org/missing", dry_run=True)
    with pytest.raises(DryRunError) as gated:
        snapshot_download("org/gated", dry_run=True)

    assert isinstance(missing.value.__cause__, RepositoryNotFoundError)
    assert isinstance(gated.value.__cause__, GatedRepoError)


def test_gated_repo_needs_the_token(hub: FakeHub) -> None:
    with pytest.raises(GatedRepoError) as no_token:
        hf_hub_download("org/gated", "config.json")
    with pytest.raises(GatedRepoError) as wrong_token:
        snapshot_download("org/gated", token="wrong")
    with pytest.raises(GatedRepoError):
        HfApi().model_info("org/gated")

    assert (no_token.value.response.status_code, wrong_token.value.response.status_code) == (401, 403)
    assert Path(hf_hub_download("org/gated", "config.json", token="s3cret")).read_bytes() == CONFIG


def test_cut_transfer_resumes_with_a_range_request(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_resume(monkeypatch, chunk_size=1024)
    hub.cut_after["model.bin"] = 5 * 1024
    Recorder.bars = []
    path = hf_hub_download(REPO, "model.bin", tqdm_class=Recorder)

    assert Path(path).read_bytes() == WEIGHTS
    assert hub.file_gets("model.bin") == [None, "bytes=5120-"]
    [bar] = Recorder.bars  # the retry reuses the bar: its updates still sum to the file
    assert sum(bar.updates) == len(WEIGHTS)


def test_failed_transfer_leaves_no_partial_file_and_restarts(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fast_resume(monkeypatch, chunk_size=1024)
    hub.cut_after["model.bin"], hub.cut_times["model.bin"] = 5 * 1024, 6  # the first try and its 5 retries
    with pytest.raises(TRANSPORT_ERRORS):  # httpx2's in huggingface_hub 2.x, httpx's before
        hf_hub_download(REPO, "model.bin")
    assert hub.file_gets("model.bin") == [None] + ["bytes=5120-"] * 5
    assert list((tmp_path / "hub").rglob("*.incomplete")) == []

    assert Path(hf_hub_download(REPO, "model.bin")).read_bytes() == WEIGHTS
    assert hub.file_gets("model.bin")[6:] == [None]  # 2.4.0 never resumes across calls


def test_concurrent_callers_download_once(hub: FakeHub) -> None:
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(hf_hub_download(REPO, "model.bin"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(paths)) == 1 and Path(paths[0]).read_bytes() == WEIGHTS
    assert hub.file_gets("model.bin") == [None]
    assert [r.method for r in hub.requests].count("HEAD") == 4


def test_offline_uses_the_cache_without_asking_the_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    online = snapshot_download(REPO, allow_patterns=["*.json"])
    seen = list(hub.requests)

    assert snapshot_download(REPO, allow_patterns=["*.json"], local_files_only=True) == online
    go_offline(monkeypatch)
    assert snapshot_download(REPO, allow_patterns=["*.json"]) == online
    assert hf_hub_download(REPO, "config.json") == os.path.join(online, "config.json")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "model.bin")
    assert hub.requests == seen


def test_stop_closes_the_port() -> None:
    fake = FakeHub({}).start()
    url = fake.url
    assert httpx.get(f"{url}/api/models/a/b").status_code == 404
    fake.stop()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/models/a/b")
    assert fake.requests == [Request("GET", "/api/models/a/b", None)]
