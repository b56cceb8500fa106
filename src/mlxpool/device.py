"""What this machine's MLX device is and how much memory it has (call on the MLX worker inside the server)."""

from __future__ import annotations

import os

import mlx.core as mx


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_memory() -> int:
    """Bytes MLX can use: Metal's recommended working set, a CUDA GPU's memory, else RAM. The budget's 100%."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key])
    return _ram()


def machine_memory() -> int:
    """Bytes of memory the machine has for models (unified RAM on Apple silicon, the GPU's on CUDA, else RAM);
    what `min_memory` of a model candidate is compared with."""
    info = mx.device_info()
    for key in ("memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    return _ram()


def computes_on_cpu() -> bool:
    """Whether MLX computes on the CPU (no Metal or CUDA device): `wait_in_pieces = "auto"` turns on there."""
    return bool(mx.default_device().type == mx.DeviceType.cpu)
