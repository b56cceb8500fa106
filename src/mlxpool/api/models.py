"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.api.schemas import ModelCard, ModelList
from mlxpool.pool import ModelEntry, ModelPool

STARTED = int(time.time())


def card(entry: ModelEntry) -> ModelCard:
    spec = entry.spec
    return ModelCard(id=spec.name, created=STARTED, kind=spec.kind, aliases=spec.aliases, state=entry.state)


async def list_models(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    return JSONResponse(ModelList(data=[card(e) for e in pool.entries.values()]).model_dump())


async def get_model(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    return JSONResponse(card(pool.resolve(request.path_params["model"])).model_dump())
