from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from mlxpool.api import create_app
from mlxpool.config import Settings, settings_from_dict
from mlxpool.demo import build_tiny_bert, build_tiny_qwen3_embedding
from mlxpool.pool import ModelPool
from mlxpool.worker import Worker


@pytest.fixture(autouse=True)
def collect_earlier_garbage() -> None:
    """Free the last test's MLX arrays now, not during this test's loads, where they would skew measurements.

    Start-up objects are frozen once, so these collections stay cheap.
    """
    if not gc.isenabled():
        return
    if gc.get_freeze_count() == 0:
        import mlx_embeddings.utils  # noqa: F401  (its import pulls in transformers: freeze that too)

        gc.collect()
        gc.freeze()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def logs_in_a_temporary_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers the tests start (they inherit the environment) write their log files here, not in ~/.mlxpool/logs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXPOOL_LOGS_DIR", str(tmp_path_factory.mktemp("logs")))
        yield


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    """A started MLX worker thread, stopped after the test."""
    w = Worker()
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {"bert": build_tiny_bert(root / "bert"), "qwen3": build_tiny_qwen3_embedding(root / "qwen3")}


def make_settings(models: dict[str, dict[str, Any]], **server: Any) -> Settings:
    return settings_from_dict({"server": server, "models": models}, Path("test.toml"), {})


class Served:
    """An app running its lifespan, with an httpx client and an openai client over ASGITransport."""

    def __init__(self, app: Starlette, http: httpx.AsyncClient):
        self.app = app
        self.http = http
        # openai's stubs name its vendored httpx fork; an httpx.AsyncClient works the same at run time.
        self.openai = openai.AsyncOpenAI(
            base_url="http://mlxpool/v1",
            api_key="unused",
            http_client=http,  # type: ignore[arg-type]
        )

    @property
    def pool(self) -> ModelPool:
        pool: ModelPool = self.app.state.pool
        return pool

    async def wait_ready(self, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not self.pool.ready:
                await asyncio.sleep(0.01)


ServeFactory = Callable[..., Any]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """`async with serve(settings, loader=..., clock=...) as s:` runs the app in-process."""
    import contextlib

    @contextlib.asynccontextmanager
    async def start(settings: Settings, **kwargs: Any) -> AsyncIterator[Served]:
        app = create_app(settings, **kwargs)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://mlxpool", timeout=60) as http:
                yield Served(app, http)

    yield start


@pytest.fixture
def real_models() -> Path:
    """The directory of real weights (tests/README: MLXPOOL_REAL_MODELS); the real tier is skipped without it."""
    root = os.environ.get("MLXPOOL_REAL_MODELS")
    if not root:
        pytest.skip("MLXPOOL_REAL_MODELS is not set")
    return Path(root)
