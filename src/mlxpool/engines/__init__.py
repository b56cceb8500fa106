"""One adapter per backend package; `load_engine` picks the adapter for a model's kind."""

from __future__ import annotations

from pathlib import Path

from mlxpool.config import ModelSpec
from mlxpool.engines.base import Engine, Loader
from mlxpool.errors import UnsupportedKindError
from mlxpool.worker import Task, Worker


def load_engine(spec: ModelSpec, path: Path, worker: Worker) -> Task[Engine]:
    """The loader task for `spec`; kinds without an engine yet fail clearly."""
    if spec.kind == "embedding":
        from mlxpool.engines.embedding import load_embedding

        return (yield from load_embedding(spec, path, worker))
    if spec.kind == "chat":
        from mlxpool.engines.chat import load_chat

        return (yield from load_chat(spec, path, worker))
    if spec.kind == "asr":
        from mlxpool.engines.asr import load_asr

        return (yield from load_asr(spec, path, worker))
    if spec.kind in ("vision", "ocr"):
        from mlxpool.engines.vision import load_vision

        return (yield from load_vision(spec, path, worker))
    if spec.kind == "tts":
        from mlxpool.engines.tts import load_tts

        return (yield from load_tts(spec, path, worker))
    raise UnsupportedKindError(f"model {spec.name!r}: kind {spec.kind!r} has no engine in this version")


__all__ = ["Engine", "Loader", "load_engine"]
