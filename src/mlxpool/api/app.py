"""create_app(settings): the Starlette app, its routes, and the pool's life inside the app's lifespan."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from mlxpool.api import admin, audio, chat, embeddings, metrics, models, ocr, speech, status
from mlxpool.api.access import RequestObserver, log_request
from mlxpool.api.auth import security_middleware
from mlxpool.api.disconnect import ClientDisconnected
from mlxpool.api.errors import EXCEPTION_HANDLERS
from mlxpool.api.limits import BodyLimit
from mlxpool.clock import Clock
from mlxpool.config import Settings, parse_size
from mlxpool.device import computes_on_cpu, machine_memory, usable_memory
from mlxpool.engines import Loader, load_engine
from mlxpool.pool import ModelPool
from mlxpool.worker import GilSlices, Worker, choose_cuda_attention

log = logging.getLogger(__name__)

# OpenAI routes answer with and without the /v1 prefix.
OPENAI_ROUTES = [
    ("/chat/completions", chat.create_chat_completion, ["POST"]),
    ("/completions", chat.create_completion, ["POST"]),
    ("/embeddings", embeddings.create_embeddings, ["POST"]),
    ("/ocr", ocr.create_ocr, ["POST"]),
    ("/audio/transcriptions", audio.create_transcription, ["POST"]),
    ("/audio/translations", audio.create_translation, ["POST"]),
    ("/audio/speech", speech.create_speech, ["POST"]),
    ("/audio/voices", speech.list_voices, ["GET"]),
    ("/models", models.list_models, ["GET"]),
    ("/models/{model:path}", models.get_model, ["GET"]),
]
OTHER_ROUTES = [
    ("/health", admin.health, ["GET"]),
    ("/health/ready", admin.ready, ["GET"]),
    ("/admin/models", admin.list_pool, ["GET"]),
    ("/admin/models/{name:path}/load", admin.load_model, ["POST"]),
    ("/admin/models/{name:path}/unload", admin.unload_model, ["POST"]),
    ("/admin/requests", metrics.list_requests, ["GET"]),
    ("/metrics", metrics.scrape, ["GET"]),
    ("/", status.status_page, ["GET"]),
]


def routes() -> list[BaseRoute]:
    table: list[BaseRoute] = []
    for path, endpoint, methods in OPENAI_ROUTES:
        table += [Route("/v1" + path, endpoint, methods=methods), Route(path, endpoint, methods=methods)]
    table += [Route(path, endpoint, methods=methods) for path, endpoint, methods in OTHER_ROUTES]
    return table


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


def create_app(settings: Settings, *, loader: Loader = load_engine, clock: Clock | None = None) -> Starlette:
    """The server app. The worker thread and the pool live as long as the app's lifespan."""
    measured = metrics.Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        choose_cuda_attention(settings.server.cudnn_attention)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(settings.server.gil_switch_interval)
        server = settings.server
        gil = GilSlices(server.gil_switch_interval, server.shared_gil_switch_interval)
        worker = Worker(gil, server.forward_pieces)
        worker.start()
        waits = server.wait_in_pieces
        worker.waits_in_pieces = await worker.call(computes_on_cpu) if waits == "auto" else waits
        gc.freeze()  # start-up objects live forever: keep them out of every later full collection
        budget = parse_size(settings.server.memory_budget, await worker.call(usable_memory))
        machine = settings.for_memory(await worker.call(machine_memory))
        pool = ModelPool(machine, worker, budget, loader=loader, clock=clock)
        app.state.pool = pool
        app.state.settings = settings
        app.state.metrics = measured
        measured.pool = pool  # the metrics read the pool's figures when scraped
        log.info("memory budget %.2f GiB; %d models configured", budget / 2**30, len(pool.entries))
        pool.start()
        try:
            yield
        finally:
            await pool.close()
            worker.stop()
            sys.setswitchinterval(switch_interval)

    return Starlette(
        routes=routes(),
        middleware=[
            Middleware(RequestObserver, records=[log_request, measured.record]),
            *security_middleware(settings.server),
            Middleware(BodyLimit, max_bytes=settings.server.max_request_size),
        ],
        exception_handlers={**EXCEPTION_HANDLERS, ClientDisconnected: _client_gone},
        lifespan=lifespan,
    )
