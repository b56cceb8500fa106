"""POST /v1/ocr: an image or a PDF in, its text out, `{"text": ..., "pages": [...]}`.

mlxpool's own route (OpenAI has none). The file comes as multipart (`file`) or JSON (`file`: a data: URI, plain
base64, an http(s) URL or a file:// path under `image_dirs`). PDF pages are rendered with pypdfium2 in a thread;
all pages of a document decode together in the model's batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxpool.api.chat import OCR_PROMPT
from mlxpool.api.disconnect import run_until_disconnect
from mlxpool.api.errors import parse_body_or_raise
from mlxpool.api.images import decode_image_or_raise, fetch_bytes_or_raise
from mlxpool.api.metrics import count_tokens
from mlxpool.config import ServerSettings
from mlxpool.engines.chat import SamplingParams
from mlxpool.engines.vision import VisionEngine, VisionInput
from mlxpool.errors import InvalidImageError, InvalidRequestError, UnsupportedKindError
from mlxpool.pool import ModelPool


class OcrRequest(BaseModel):
    """mlxpool's OCR request; `file` is what multipart sends as a file part."""

    model_config = ConfigDict(extra="ignore")

    model: str
    file: str
    prompt: str | None = None
    """The instruction sent with each page; the model's `prompt` setting (else `OCR:`) if unset."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens per page; the model's `max_tokens` if unset."""
    dpi: int = Field(default=144, ge=36, le=600)
    """Resolution PDF pages are rendered at."""


async def create_ocr(request: Request) -> Response:
    settings: ServerSettings = request.app.state.settings.server
    body, data = await _request_or_raise(request, settings)
    pool: ModelPool = request.app.state.pool
    spec = pool.resolve(body.model, "ocr").spec
    request.state.model = spec.name  # for the request log and the metrics
    if spec.kind not in ("ocr", "vision"):
        raise UnsupportedKindError(
            f"model {spec.name!r} is a {spec.kind} model; OCR needs an ocr or vision model", param="model"
        )
    pages = await asyncio.to_thread(_pages_or_raise, data, body.dpi, settings)
    params = SamplingParams(max_tokens=body.max_tokens or spec.max_tokens, temperature=0.0)
    prompt = body.prompt or spec.prompt or OCR_PROMPT
    texts, usage = await run_until_disconnect(request, _read(pool, spec.name, pages, prompt, params))
    count_tokens(request, spec.name, usage)
    request.state.tokens = usage["total_tokens"]
    return JSONResponse(
        {
            "object": "ocr",
            "model": spec.name,
            "text": "\n\n".join(texts),
            "pages": [
                {"index": i, "text": text, "width": page.width, "height": page.height}
                for i, (page, text) in enumerate(zip(pages, texts, strict=True))
            ],
            "usage": usage,
        }
    )


async def _request_or_raise(request: Request, settings: ServerSettings) -> tuple[OcrRequest, bytes]:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequestError("send the image or PDF as the multipart file part `file`", param="file")
            data = await upload.read(settings.max_image_size + 1)
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            body = OcrRequest.model_validate({**fields, "file": upload.filename or "upload"})
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            raise InvalidRequestError(f"Invalid value for '{param}': {first['msg']}", param=param) from None
        if len(data) > settings.max_image_size:
            raise InvalidImageError(f"file: over the limit of {settings.max_image_size} bytes", param="file")
        if not data:
            raise InvalidImageError("file: the file is empty", param="file")
        return body, data
    body = await parse_body_or_raise(request, OcrRequest)
    return body, await fetch_bytes_or_raise(body.file, settings, "file")


def _pages_or_raise(data: bytes, dpi: int, settings: ServerSettings) -> list[Image.Image]:
    """The pages of a PDF rendered at `dpi`, or the one image."""
    if not data.startswith(b"%PDF"):
        return [decode_image_or_raise(data, settings, "file")]
    import pypdfium2  # type: ignore[import-untyped]

    try:
        document = pypdfium2.PdfDocument(data)
    except pypdfium2.PdfiumError as exc:
        raise InvalidImageError(f"file: not a readable PDF ({exc})", param="file") from exc
    try:
        if len(document) == 0 or len(document) > settings.max_pdf_pages:
            raise InvalidImageError(
                f"file: the PDF has {len(document)} pages; 1 to {settings.max_pdf_pages} are accepted", param="file"
            )
        pages = []
        for page in document:
            width, height = page.get_size()
            if width * height * (dpi / 72) ** 2 > settings.max_image_pixels:
                raise InvalidImageError(f"file: a page at {dpi} dpi is over max_image_pixels; lower dpi", param="file")
            pages.append(page.render(scale=dpi / 72).to_pil().convert("RGB"))
        return pages
    finally:
        document.close()


async def _read(
    pool: ModelPool, model: str, pages: list[Image.Image], prompt: str, params: SamplingParams
) -> tuple[list[str], dict[str, int]]:
    async with pool.acquire(model) as engine:
        assert isinstance(engine, VisionEngine)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = await asyncio.to_thread(engine.apply_chat_template, messages)
        ids = await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens=False)
        results = await asyncio.gather(*(_read_page(engine, ids, text, page, params) for page in pages))
    usage = {"prompt_tokens": sum(r[1] for r in results), "completion_tokens": sum(r[2] for r in results)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return [r[0] for r in results], usage


async def _read_page(
    engine: VisionEngine, ids: list[int], text: str, page: Image.Image, params: SamplingParams
) -> tuple[str, int, int]:
    pieces: list[str] = []
    last: Any = None
    async for delta in engine.generate(ids, params, VisionInput(text, (page,))):
        pieces.append(delta.text)
        last = delta
    return "".join(pieces).strip(), last.prompt_tokens, last.completion_tokens
