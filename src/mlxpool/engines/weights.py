"""Materializing a lazily loaded model's weights a slice per worker step, so other models keep their turns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxpool.worker import Task

SLICE_BYTES = 128 * 2**20


def materialize(model: Any, limit: int = SLICE_BYTES) -> Task[None]:
    """Evaluate the model's arrays about `limit` bytes per step (half precision becomes float32 on the CPU)."""
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # half-precision matmuls are slow on the CPU backend
    for arrays in weight_slices(model, limit):
        mx.eval(arrays)
        yield


def weight_slices(model: Any, limit: int = SLICE_BYTES) -> Iterator[list[mx.array]]:
    """The model's arrays in groups of about `limit` bytes."""
    group: list[mx.array] = []
    size = 0
    for _, array in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())):
        group.append(array)
        size += array.nbytes
        if size >= limit:
            yield group
            group, size = [], 0
    if group:
        yield group
