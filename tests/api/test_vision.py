"""Chat with images on a tiny random-weight Qwen2-VL (mlx-vlm): images reach the model (the prompt grows by
their tokens), text-only requests work, and bad images get a 400 naming the part."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mlxpool.demo import build_tiny_vlm
from tests.conftest import Served, ServeFactory, make_settings


def png(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(*parts: dict[str, Any], text: str = "Describe this image.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "qwen2-vl")


@pytest.fixture
async def served(serve: ServeFactory, tiny_vlm: Path, tmp_path: Path) -> AsyncIterator[Served]:
    (tmp_path / "allowed").mkdir()
    settings = make_settings(
        {
            "vision": {"kind": "vision", "path": str(tiny_vlm), "memory_reserve": "16MB"},
            "ocr": {"kind": "ocr", "path": str(tiny_vlm), "memory_reserve": "16MB"},
        },
        image_dirs=[str(tmp_path / "allowed")],
        max_image_bytes="200KB",
        max_image_pixels=2_000_000,
        image_fetch_timeout=2,
    )
    async with serve(settings) as s:
        yield s


async def chat(s: Served, messages: list[dict[str, Any]], model: str = "vision", **kwargs: Any) -> Any:
    return await s.http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": 6, "temperature": 0, **kwargs},
    )


async def test_an_image_reaches_the_model_and_counts_in_usage(served: Served) -> None:
    text_only = (await chat(served, ask())).json()
    with_image = (await chat(served, ask(image(data_uri(png()))))).json()
    assert with_image["choices"][0]["finish_reason"] == "length"
    assert with_image["usage"]["completion_tokens"] == 6
    # the placeholder expands to the image's tokens: (64x48 resized to 56x56) / 14^2 patches / 2x2 merge = 4
    assert with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] >= 4 + 2


async def test_text_only_and_streamed_requests_work_on_a_vision_model(served: Served) -> None:
    response = await served.openai.chat.completions.create(
        model="vision", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, stream=True, temperature=0,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in response]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


async def test_the_image_changes_the_answer_and_sampling_is_per_request(served: Served) -> None:
    noise = Image.effect_noise((64, 64), 100).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")

    async def answer(picture: bytes, seed: int) -> str:
        # random weights favour one token so much that greedy answers match: sample hot, with a fixed seed
        response = await chat(served, ask(image(data_uri(picture))), temperature=2, seed=seed, max_tokens=16)
        return str(response.json()["choices"][0]["message"]["content"])

    red = await answer(png(color=(255, 0, 0)), seed=1)
    assert red == await answer(png(color=(255, 0, 0)), seed=1)  # same image, same seed: same sample
    assert red != await answer(buffer.getvalue(), seed=1)  # another image: the image reached the model
    assert red != await answer(png(color=(255, 0, 0)), seed=2)  # another seed: sampling is this request's


async def test_concurrent_image_requests_all_complete(served: Served) -> None:
    colors = [(i * 40, 255 - i * 30, 90) for i in range(6)]
    responses = await asyncio.gather(*(chat(served, ask(image(data_uri(png(color=c))))) for c in colors))
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in responses), [r.json() for r in responses]


async def test_file_urls_under_image_dirs(served: Served, tmp_path: Path) -> None:
    (tmp_path / "allowed" / "a.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    ok = await chat(served, ask(image(f"file://{tmp_path}/allowed/a.png")))
    assert ok.status_code == 200
    refused = await chat(served, ask(image(f"file://{tmp_path}/outside.png")))
    assert refused.status_code == 400 and "outside image_dirs" in refused.json()["error"]["message"]
    traversal = await chat(served, ask(image(f"file://{tmp_path}/allowed/../outside.png")))
    assert traversal.status_code == 400


def too_many_pixels() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2000, 1500)).save(buffer, format="PNG")  # 3 Mpx, compresses to a few KB
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (data_uri(b"not an image at all"), "not a readable image"),
        (data_uri(png()[:40]), "not a readable image"),  # truncated
        ("data:image/png;base64,@@@", "not valid base64"),
        (data_uri(bytes(300_000)), "limit"),
        (data_uri(too_many_pixels()), "pixels"),
        ("ftp://example.com/a.png", "not supported"),
        ("data:image/png;base64,", "empty"),
    ],
)
async def test_bad_images_are_a_400_naming_the_part(served: Served, url: str, says: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *ask(image(data_uri(png())), image(url))]
    response = await chat(served, messages)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[1].content[1].image_url" and error["code"] == "invalid_image"
    assert says in error["message"]
    assert (await chat(served, ask(image(data_uri(png()))))).status_code == 200  # and the server goes on


class _ImageSite(BaseHTTPRequestHandler):
    """/ok.png, /huge (over the limit), /slow (past the timeout), anything else 404."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(4)
        body = {"/ok.png": png(), "/huge": bytes(500_000), "/slow": png()}.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body or b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def image_site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageSite)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_image_urls_are_fetched_with_limits(served: Served, image_site: str) -> None:
    assert (await chat(served, ask(image(f"{image_site}/ok.png")))).status_code == 200
    for path, says in (("/missing", "HTTP 404"), ("/slow", "took over 2"), ("/huge", "over the limit")):
        response = await chat(served, ask(image(f"{image_site}{path}")))
        assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


async def test_an_image_for_a_text_model_is_refused(serve: ServeFactory, tmp_path: Path) -> None:
    from mlxpool.demo import build_tiny_chat

    settings = make_settings({"chat": {"kind": "chat", "path": str(build_tiny_chat(tmp_path / "chat"))}})
    async with serve(settings) as s:
        response = await chat(s, ask(image(data_uri(png()))), model="chat")
        assert response.status_code == 400 and "image_url" in response.json()["error"]["message"]


async def test_logprobs_on_a_vision_model_are_refused(served: Served) -> None:
    response = await chat(served, ask(), logprobs=True)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
