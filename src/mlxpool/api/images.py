"""Images for vision models: `image_url` parts (data: URIs, `file://` paths under `image_dirs`, http(s) URLs)
fetched with a size limit and a timeout, then decoded with Pillow in a thread. Any failure is a 400 that names
the part."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from mlxpool.api.schemas import ChatMessage
from mlxpool.config import ServerSettings
from mlxpool.errors import InvalidImageError


async def fetch_bytes_or_raise(url: str, settings: ServerSettings, param: str) -> bytes:
    """The bytes behind a data: URI, a file:// URL, an http(s) URL, or plain base64."""
    limit = settings.max_image_size
    scheme = urlparse(url).scheme.lower() if ":" in url[:10] else ""
    if scheme == "data":
        data = _decode_base64_or_raise(url.partition(",")[2], param)
    elif scheme == "file":
        data = await asyncio.to_thread(_read_file_or_raise, url, settings, param)
    elif scheme in ("http", "https"):
        data = await _download_or_raise(url, settings, param)
    elif not scheme:
        data = _decode_base64_or_raise(url, param)
    else:
        raise InvalidImageError(
            f"{param}: URL scheme {scheme!r} is not supported (data:, file://, http(s)://)", param=param
        )
    if len(data) > limit:
        raise InvalidImageError(f"{param}: the image is {len(data)} bytes; the limit is {limit}", param=param)
    if not data:
        raise InvalidImageError(f"{param}: the image is empty", param=param)
    return data


def decode_image_or_raise(data: bytes, settings: ServerSettings, param: str) -> Image.Image:
    """An RGB image, or a 400 for bytes Pillow cannot read or an image over `max_image_pixels`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise InvalidImageError(
                    f"{param}: the image is {width}x{height} pixels; the limit is {settings.max_image_pixels}",
                    param=param,
                )
            return image.convert("RGB")
    except InvalidImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{param}: not a readable image ({exc})", param=param) from exc


async def load_image_or_raise(url: str, settings: ServerSettings, param: str) -> Image.Image:
    data = await fetch_bytes_or_raise(url, settings, param)
    return await asyncio.to_thread(decode_image_or_raise, data, settings, param)


async def gather_images_or_raise(messages: list[ChatMessage], settings: ServerSettings) -> list[Image.Image]:
    """Every image of the conversation, fetched and decoded concurrently, in order of appearance."""
    loads = []
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type == "image_url":
                param = f"messages[{i}].content[{j}].image_url"
                url = image_url_of(part.model_extra or {})
                if url is None:
                    raise InvalidImageError(f"{param}: give the image as {{'url': ...}}", param=param)
                loads.append(load_image_or_raise(url, settings, param))
    return list(await asyncio.gather(*loads))


def image_url_of(part: dict[str, Any]) -> str | None:
    """The URL of an OpenAI `image_url` part ({"image_url": {"url": ...}} or {"image_url": "..."})."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    return url if isinstance(url, str) else None


def _decode_base64_or_raise(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"{param}: not valid base64 ({exc})", param=param) from exc


def _read_file_or_raise(url: str, settings: ServerSettings, param: str) -> bytes:
    path = Path(unquote(urlparse(url).path)).resolve()
    roots = [Path(d).expanduser().resolve() for d in settings.image_dirs]
    if not any(path.is_relative_to(root) for root in roots):
        where = "image_dirs is empty" if not roots else f"it is outside image_dirs {[str(r) for r in roots]}"
        raise InvalidImageError(f"{param}: file URLs are not allowed here ({where})", param=param)
    try:
        with path.open("rb") as file:
            return file.read(settings.max_image_size + 1)
    except OSError as exc:
        raise InvalidImageError(f"{param}: cannot read {path}: {exc.strerror or exc}", param=param) from exc


async def _download_or_raise(url: str, settings: ServerSettings, param: str) -> bytes:
    timeout = settings.image_fetch_timeout
    try:
        async with asyncio.timeout(timeout):  # the whole fetch, not each read
            return await _download(url, settings.max_image_size, param)
    except TimeoutError as exc:
        raise InvalidImageError(f"{param}: fetching {url} took over {timeout}s", param=param) from exc
    except httpx.HTTPError as exc:
        raise InvalidImageError(f"{param}: cannot fetch {url}: {exc}", param=param) from exc


async def _download(url: str, limit: int, param: str) -> bytes:
    client = httpx.AsyncClient(follow_redirects=True)
    async with client, client.stream("GET", url) as response:
        if response.status_code != 200:
            raise InvalidImageError(f"{param}: fetching {url} answered HTTP {response.status_code}", param=param)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise InvalidImageError(f"{param}: the image at {url} is over the limit of {limit} bytes", param=param)
        return bytes(data)
