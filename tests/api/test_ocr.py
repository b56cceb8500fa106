"""POST /v1/ocr and OCR-kind chat on the tiny Qwen2-VL: images and PDFs (made with Pillow, rendered by
pypdfium2) in, one text per page out; random weights, so we test structure, not the text."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api.test_vision import ask, chat, data_uri, image, png, tiny_vlm  # noqa: F401  (fixture)
from tests.conftest import Served, ServeFactory, make_settings


def pdf(pages: int, size: tuple[int, int] = (144, 72)) -> bytes:
    """A PDF of `pages` pages of `size` points (Pillow writes one page per image at 72 dpi)."""
    images = [Image.new("RGB", size, (255, 255, 255 - 20 * i)) for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return buffer.getvalue()


@pytest.fixture
async def served(serve: ServeFactory, tiny_vlm: Path) -> AsyncIterator[Served]:  # noqa: F811
    settings = make_settings(
        {
            "ocr": {"kind": "ocr", "path": str(tiny_vlm), "memory_reserve": "16MB", "max_tokens": 8},
            "vision": {"kind": "vision", "path": str(tiny_vlm), "memory_reserve": "16MB"},
            "other": {"kind": "embedding", "path": str(tiny_vlm), "memory_reserve": "16MB"},
        },
        max_pdf_pages=4,
    )
    async with serve(settings) as s:
        yield s


async def test_an_image_as_multipart(served: Served) -> None:
    response = await served.http.post("/v1/ocr", data={"model": "ocr"}, files={"file": ("a.png", png((80, 40)))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "ocr" and body["model"] == "ocr"
    assert [(p["index"], p["width"], p["height"]) for p in body["pages"]] == [(0, 80, 40)]
    assert body["text"] == body["pages"][0]["text"]
    assert 0 < body["usage"]["completion_tokens"] <= 8


async def test_a_pdf_gives_one_text_per_page(served: Served) -> None:
    response = await served.http.post(
        "/ocr", json={"model": "ocr", "file": base64.b64encode(pdf(3)).decode(), "dpi": 144, "max_tokens": 5}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(p["index"], p["width"], p["height"]) for p in body["pages"]] == [(i, 288, 144) for i in range(3)]
    assert body["text"] == "\n\n".join(p["text"] for p in body["pages"])
    assert body["usage"]["completion_tokens"] <= 15 and body["usage"]["prompt_tokens"] > 3 * 8


async def test_pages_read_alone_match_pages_read_together(served: Served) -> None:
    """Batched pages decode exactly as single ones (greedy), so batching changes nothing."""
    together = (
        await served.http.post("/ocr", json={"model": "ocr", "file": data_uri(pdf(2), "application/pdf")})
    ).json()
    alone = []
    for i in range(2):
        single = Image.new("RGB", (144, 72), (255, 255, 255 - 20 * i))
        buffer = io.BytesIO()
        single.resize((288, 144)).save(buffer, format="PNG")
        alone.append(
            (await served.http.post("/ocr", json={"model": "ocr", "file": data_uri(buffer.getvalue())})).json()
        )
    assert [p["text"] for p in together["pages"]] == [a["text"] for a in alone]


async def test_ocr_chat_without_text_uses_the_ocr_prompt_at_temperature_zero(served: Served) -> None:
    picture = image(data_uri(png()))
    ocr = (await chat(served, [{"role": "user", "content": [picture]}], model="ocr", max_tokens=10)).json()
    same = (await chat(served, ask(picture, text="OCR:"), model="vision", max_tokens=10, temperature=0)).json()
    assert ocr.get("usage") == same.get("usage"), (ocr, same)
    assert ocr["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "param", "says"),
    [
        ({"json": {"model": "ocr", "file": base64.b64encode(b"%PDF-1.4 broken").decode()}}, 400, "file", "PDF"),
        ({"json": {"model": "ocr", "file": base64.b64encode(pdf(5)).decode()}}, 400, "file", "5 pages"),
        ({"json": {"model": "ocr", "file": data_uri(b"garbage")}}, 400, "file", "not a readable image"),
        ({"json": {"model": "other", "file": data_uri(png())}}, 400, "model", "embedding model"),
        ({"json": {"model": "ocr"}}, 400, "file", "file"),
        ({"data": {"model": "ocr"}, "files": {"other": ("a.png", b"x")}}, 400, "file", "`file`"),
        ({"json": {"model": "ocr", "file": data_uri(png()), "dpi": 5000}}, 400, "dpi", "dpi"),
        ({"json": {"model": "nope", "file": data_uri(png())}}, 404, "model", "nope"),
    ],
)
async def test_bad_ocr_requests(
    served: Served, request_kwargs: dict[str, Any], status: int, param: str, says: str
) -> None:
    response = await served.http.post("/v1/ocr", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]
