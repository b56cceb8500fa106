"""Request preparation the event loop does itself when it is small, and hands to a thread when it is not.

A hop to a thread (`asyncio.to_thread`) cost the loop about 140 us of its own CPU on the 2-core test machine,
more than tokenizing a short prompt (80 us for 120 characters) or rendering a short chat template (40 us). A wave of
64 new chat requests paid two hops each, and the loop's time for them is time that other requests (an embedding's
answer, the streams' next tokens) wait behind (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INLINE_CHARS = 2048
"""Text up to this many characters is tokenized (and its template rendered) on the loop."""


async def run_off_loop_if_large(fn: Callable[[], T], chars: int) -> T:
    """`fn()` on the loop when its input is `chars` long or shorter, else on a thread."""
    return fn() if chars <= INLINE_CHARS else await asyncio.to_thread(fn)
