"""Every error leaves the server here, as an OpenAI error body: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.errors import InvalidRequestError, MlxpoolError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

_HTTP_TYPES = {
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: MlxpoolError) -> JSONResponse:
    headers = {} if exc.retry_after is None else {"Retry-After": str(max(1, round(exc.retry_after)))}
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


async def on_mlxpool_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MlxpoolError)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_, code = _HTTP_TYPES.get(exc.status_code, ("invalid_request_error", None))
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, type_, None, code), exc.status_code, headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("The server had an internal error.", "server_error"), 500)


EXCEPTION_HANDLERS = {
    MlxpoolError: on_mlxpool_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}


async def parse_body_or_raise(request: Request, schema: type[M]) -> M:
    """The JSON body validated against `schema`, or a 400 naming the first bad field."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = f"'{param}'" if param else "the request body"
        raise InvalidRequestError(f"Invalid value for {where}: {first['msg']}", param=param) from None
