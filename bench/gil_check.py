"""Does an MLX evaluation on one thread let another Python thread run? (diagnostic for the worker design)

    python bench/gil_check.py
Prints how much Python work the main thread gets done while a second thread evaluates MLX graphs, relative to
the same work alone, plus the cost of the calls the worker makes after every step.
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np


def spin(seconds: float) -> int:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def main() -> None:
    size = 4096 if mx.default_device().type == mx.gpu else 512
    a = mx.random.normal((size, size)).astype(mx.bfloat16)
    mx.eval(a)
    stop = threading.Event()
    evals = 0

    def evaluate() -> None:
        nonlocal evals
        while not stop.is_set():
            b = a
            for _ in range(20):
                b = b @ a
            mx.eval(b)
            evals += 1

    alone = spin(2.0)
    thread = threading.Thread(target=evaluate)
    thread.start()
    time.sleep(0.2)
    shared = spin(2.0)
    stop.set()
    thread.join()
    print(
        f"{mx.default_device()}: main-thread Python work while another thread evaluates: {shared / alone:.0%} "
        f"of alone ({evals} evaluations of 20 matmuls {size}x{size})"
    )

    start = time.perf_counter()
    for _ in range(1000):
        mx.get_active_memory()
    print(f"mx.get_active_memory(): {(time.perf_counter() - start) * 1e3:.3f} us per call")
    x = mx.ones((4, 1024))
    mx.eval(x)
    start = time.perf_counter()
    for _ in range(1000):
        np.array(x)
    print(f"np.array of an evaluated (4, 1024) array: {(time.perf_counter() - start) * 1e3:.3f} us per call")
    start = time.perf_counter()
    for _ in range(100):
        y = x + 1
        mx.eval(y)
    print(f"tiny graph eval round trip: {(time.perf_counter() - start) * 1e4:.1f} us per call")


if __name__ == "__main__":
    main()
