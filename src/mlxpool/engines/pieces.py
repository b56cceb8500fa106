"""A text model's forward pass in pieces, so that other models wait for a piece of a step rather than a whole one.

On a GPU a decode step's cost is mostly MLX's host work when the step is evaluated (encoding kernels, cuBLASLt
calls, CUDA graphs): 8-10 ms for a batch of 64, 30-45 ms after the batch changed. An embedding that arrives during
it waits for all of it. While the worker hands over (`Worker.hands_over`: other models have had work lately, and one
of them may step between this one's pieces), the modules that end a piece launch what the step has built so far
(`mx.async_eval`) and let the worker step the other engines that have work (`Worker.between_pieces`) before the
next piece is built. The results are the same: only where evaluation starts moves. Each cut costs the model
throughput (on an H200, up to half of a chat batch's tokens/s when every decode step was cut), so only the passes
that the engine calls costly are cut: for a chat batch, the admission pieces and the decode step after the batch
changed (engines/batching.py). A model working alone is not cut.

On MLX's CPU backend a step's wall time is the CPU stream's compute, and the worker waits it out whole (mlx-lm's
generator evaluates a step's tokens while the next step computes). With `wait_in_pieces` (`Worker.waits_in_pieces`;
on by default where MLX computes on the CPU) every batch step is cut while the worker hands over, and before the
next step the engine waits for the last one piece by piece (`Cut.wait`), letting waiting engines step after each
piece: an embedding that arrives waits for a piece of compute, not a step. There only engines whose steps are no
longer than this model's step between its pieces, and a model beside only slower ones keeps its steps whole
(`Worker._may_step_between`). A piece ends after a layer's attention or after a layer, so even a 2-layer model is cut
in 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.nn import Module  # type: ignore[attr-defined]

from mlxpool.worker import Worker


class Cut:
    """Where a model's forward pass ends its pieces, and the pieces launched since the engine last waited for them."""

    def __init__(self, worker: Worker, costly: Callable[[], bool]):
        self.worker = worker
        self.costly = costly
        """Whether the forward pass running now is one to cut (while the worker has company)."""
        self.ends = 0
        """Modules that end a piece."""
        self.launched: list[Any] = []
        self.waited = 0
        """Pieces waited for one at a time."""

    def wait(self, outputs: list[Any]) -> None:
        """Wait for the pieces launched since the last wait, then for `outputs` (the last step's), one at a time,
        letting the worker's waiting engines step after each (worker only)."""
        pieces, self.launched = self.launched, []
        for array in [*pieces, *outputs]:
            mx.eval(array)
            self.worker.between_pieces()
        self.waited += len(pieces)


def cut_into_pieces(layers: list[Any], worker: Worker, costly: Callable[[], bool] = lambda: True) -> Cut:
    """Make every `len(points) / worker.pieces`-th of the forward pass's points (each layer's attention and each layer,
    in order; not the last layer) end a piece, in forward passes for which `costly()` holds."""
    cut = Cut(worker, costly)
    if worker.pieces <= 1 or len(layers) < 2:
        return cut
    points = [m for layer in layers for m in (_attention(layer), layer) if m is not None]
    every = math.ceil(len(points) / worker.pieces)
    for module in points[every - 1 : -1 : every]:
        module.__class__ = _ending_a_piece(type(module))
        module.cut = cut
        cut.ends += 1
    return cut


def text_layers(model: Any) -> list[Any] | None:
    """The decoder layers of a text model (mlx-lm, or mlx-vlm's), if it exposes them as a list."""
    layers = getattr(model, "layers", None)
    return layers if isinstance(layers, list) and all(isinstance(layer, Module) for layer in layers) else None


def _attention(layer: Any) -> Module | None:
    attention = getattr(layer, "self_attn", None)
    return attention if isinstance(attention, Module) else None


class EndsAPiece:
    """Mixed into a module's class: after the module, launch the step so far and let waiting engines step."""

    cut: Cut

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        cut = self.cut
        if cut.worker.hands_over and cut.costly():
            mx.async_eval(out)  # type: ignore[no-untyped-call]
            if cut.worker.waits_in_pieces:
                cut.launched.append(out)
            cut.worker.between_pieces()
        return out


_CLASSES: dict[type, type] = {}


def _ending_a_piece(cls: type) -> type:
    if issubclass(cls, EndsAPiece):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (EndsAPiece, cls), {})
    return _CLASSES[cls]
