"""A text model's forward pass in pieces, so that other models wait for a piece of a step rather than a whole one.

On a GPU a decode step's cost is mostly MLX's host work when the step is evaluated (encoding kernels, cuBLASLt
calls, CUDA graphs): 8-10 ms for a batch of 64, 30-45 ms after the batch changed. An embedding that arrives during
it waits for all of it. While the worker has company (`Worker.shared`), the layers that end a piece launch what
the step has built so far (`mx.async_eval`) and let the worker step the other engines that have work
(`Worker.between_pieces`) before the next piece is built. The results are the same: only where evaluation starts
moves. Each cut costs the model throughput (on an H200, up to half of a chat batch's tokens/s when every decode
step was cut), so only the passes that the engine calls costly are cut: for a chat batch, the admission pieces
and the decode step after the batch changed (engines/batching.py). A model working alone is not cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.nn import Module  # type: ignore[attr-defined]

from mlxpool.worker import Worker


def cut_into_pieces(layers: list[Any], worker: Worker, costly: Callable[[], bool] = lambda: True) -> int:
    """Make every `len(layers) / worker.pieces`-th layer (but the last) end a piece, in forward passes for which
    `costly()` holds; returns how many layers do."""
    if worker.pieces <= 1 or len(layers) < 2:
        return 0
    every = math.ceil(len(layers) / worker.pieces)
    ends = layers[every - 1 : -1 : every]
    for layer in ends:
        layer.__class__ = _ending_a_piece(type(layer))
        layer.worker = worker
        layer.costly = costly
    return len(ends)


def text_layers(model: Any) -> list[Any] | None:
    """The decoder layers of a text model (mlx-lm, or mlx-vlm's), if it exposes them as a list."""
    layers = getattr(model, "layers", None)
    return layers if isinstance(layers, list) and all(isinstance(layer, Module) for layer in layers) else None


class EndsAPiece:
    """Mixed into a layer's class: after the layer, launch the step so far and let waiting engines step."""

    worker: Worker
    costly: Callable[[], bool]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if self.worker.shared and self.costly():
            mx.async_eval(out)  # type: ignore[no-untyped-call]
            self.worker.between_pieces()
        return out


_CLASSES: dict[type, type] = {}


def _ending_a_piece(cls: type) -> type:
    if issubclass(cls, EndsAPiece):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (EndsAPiece, cls), {})
    return _CLASSES[cls]
