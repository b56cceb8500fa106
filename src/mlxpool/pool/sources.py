"""Where a model's files are: a local directory used in place, or a Hugging Face repo in the hub cache."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from mlxpool.config import Kind, ModelSpec, parse_size

# The files backends read; repos often also hold PyTorch/GGUF/ONNX copies we never need.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]

# Bytes a loaded model needs beyond its weights (activations, caches), by kind.
KIND_RESERVE: dict[Kind, int] = {
    "embedding": 256 * 2**20,
    "asr": 512 * 2**20,
    "tts": 512 * 2**20,
    "ocr": 1 * 2**30,
    "chat": 2 * 2**30,
    "vision": 2 * 2**30,
}


def cached_dir(spec: ModelSpec) -> Path | None:
    """The model's directory if it is already on disk (blocking: call it in a thread)."""
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.name!r}: {path} is not a directory")
        return path
    try:
        return Path(
            snapshot_download(str(spec.repo), revision=spec.revision, allow_patterns=MODEL_FILES, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        return None


def download(spec: ModelSpec) -> Path:
    """Fetch the model's files into the hub cache (blocking: call it in a thread)."""
    return Path(snapshot_download(str(spec.repo), revision=spec.revision, allow_patterns=MODEL_FILES))


def estimate_bytes(spec: ModelSpec, path: Path) -> int:
    """Weight file sizes plus the kind's reserve (or the model's own `memory_reserve`)."""
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    reserve = KIND_RESERVE[spec.kind] if spec.memory_reserve is None else parse_size(spec.memory_reserve)
    return weights + reserve
