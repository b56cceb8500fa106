"""Where a model's files are (a local directory used in place, or a repo in the hub cache) and how much memory
it will need, read from its safetensors headers before anything is loaded."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from huggingface_hub import get_safetensors_metadata

from mlxpool.config import Kind, ModelSpec, parse_size
from mlxpool.pool import downloads

# Bytes a loaded model needs beyond its weights (activations, caches), by kind.
KIND_RESERVE: dict[Kind, int] = {
    "embedding": 256 * 2**20,
    "asr": 512 * 2**20,
    "tts": 512 * 2**20,
    "ocr": 1 * 2**30,
    "chat": 2 * 2**30,
    "vision": 2 * 2**30,
}
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


def cached_dir(spec: ModelSpec) -> Path | None:
    """The model's directory if it is completely on disk (blocking: call it in a thread)."""
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.name!r}: {path} is not a directory")
        return path
    return downloads.snapshot_dir(spec)


def weights_bytes(path: Path) -> int:
    """Bytes of every tensor in the directory's safetensors files, from their headers (no weights are read)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total


def remote_weights_bytes(spec: ModelSpec) -> int:
    """The same, for a repo not downloaded yet: huggingface_hub reads the headers with HTTP range requests."""
    with downloads.hub_errors(spec):
        metadata = get_safetensors_metadata(str(spec.repo), revision=spec.revision)
    return sum(
        DTYPE_BYTES.get(dtype, 4) * count
        for file in metadata.files_metadata.values()
        for dtype, count in file.parameter_count.items()
    )


def reserve_bytes(spec: ModelSpec) -> int:
    return KIND_RESERVE[spec.kind] if spec.memory_reserve is None else parse_size(spec.memory_reserve)


def estimate_bytes(spec: ModelSpec, path: Path) -> int:
    """Weights (from safetensors headers) plus the kind's reserve, or the model's own `memory_reserve`."""
    return weights_bytes(path) + reserve_bytes(spec)
