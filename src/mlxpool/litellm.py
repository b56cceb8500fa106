"""`mlxpool litellm-config`: a LiteLLM proxy config routing every configured model name and alias to mlxpool.

Each name becomes a LiteLLM deployment `openai/NAME` (LiteLLM's provider for OpenAI-compatible servers) with the
server's `/v1` as `api_base`, and a `model_info.mode` for its route (chat, embedding, audio_transcription,
audio_speech). Several `--url`s give each name one deployment per server: LiteLLM balances requests across them
and retries on another one. OCR models are served to LiteLLM as chat models (images in messages); mlxpool's own
`/v1/ocr` is not LiteLLM's OCR API.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlxpool.config import Kind, Settings, load_settings

MODES: dict[Kind, str] = {
    "chat": "chat",
    "vision": "chat",
    "ocr": "chat",
    "embedding": "embedding",
    "asr": "audio_transcription",
    "tts": "audio_speech",
}
"""LiteLLM's `model_info.mode` for each kind: which of its routes the model answers (and its health check)."""
API_KEY_VARIABLE = "MLXPOOL_API_KEY"
LOCAL_HOSTS = {"0.0.0.0", "::", "", "localhost"}


def default_url(settings: Settings) -> str:
    """This machine's server as a client on it reaches it."""
    host = settings.server.host
    host = "127.0.0.1" if host in LOCAL_HOSTS else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.server.ports[0]}"


def model_list(settings: Settings, urls: list[str]) -> list[dict[str, Any]]:
    """One deployment per model name or alias and server."""
    # Never write a key into the file: LiteLLM reads it from its own environment ("os.environ/NAME").
    api_key = f"os.environ/{API_KEY_VARIABLE}" if settings.server.api_keys else "unused"
    entries = []
    for spec in settings.models.values():
        for name in [spec.name, *spec.aliases]:
            for url in urls:
                params = {"model": f"openai/{spec.name}", "api_base": f"{url.rstrip('/')}/v1", "api_key": api_key}
                entries.append({"model_name": name, "litellm_params": params, "model_info": {"mode": MODES[spec.kind]}})
    return entries


def render(settings: Settings, urls: list[str]) -> str:
    """The whole config file, with comments saying how to use it."""
    config = {
        "model_list": model_list(settings, urls),
        # A failed request (a 503 while a model loads or memory is busy) is tried again, on another server if any.
        "router_settings": {"num_retries": 2},
    }
    header = [
        f"# LiteLLM proxy config for mlxpool at {', '.join(urls)} (from {settings.source}).",
        "# Run: litellm --config THIS_FILE --port 4000",
    ]
    if settings.server.api_keys:
        header.append(f"# The servers want an API key: set {API_KEY_VARIABLE} where LiteLLM runs.")
    return "\n".join(header) + "\n" + to_yaml(config)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars; strings in JSON's double quotes, which YAML reads the same."""
    pad = " " * indent
    if isinstance(value, dict):
        return "".join(_item(f"{pad}{key}:", child, indent + 2) for key, child in value.items())
    if isinstance(value, list):
        return "".join(_list_item(pad, child, indent) for child in value)
    return f"{pad}{json.dumps(value)}\n"


def _item(head: str, child: Any, indent: int) -> str:
    if isinstance(child, dict | list) and child:
        return f"{head}\n{to_yaml(child, indent)}"
    return f"{head} {json.dumps(child)}\n"


def _list_item(pad: str, child: Any, indent: int) -> str:
    text = to_yaml(child, indent + 2)
    return f"{pad}- {text[indent + 2 :]}"  # the first line of the item starts on the dash's line


def cmd_litellm_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(render(settings, args.urls or [default_url(settings)]), end="")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `mlxpool litellm-config`."""
    parser = commands.add_parser("litellm-config", help="print a LiteLLM proxy config that routes to this server")
    parser.add_argument("--config", help="models.toml whose models to route (default: $MLXPOOL_CONFIG or shipped)")
    parser.add_argument(
        "--url",
        dest="urls",
        action="append",
        metavar="URL",
        help="a server's address as LiteLLM reaches it (default: this one's host and first port); repeat for several",
    )
    parser.set_defaults(func=cmd_litellm_config, url=None)
