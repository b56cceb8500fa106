"""Which idle models to unload so a new one fits: a pure decision, tested without threads or clocks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    name: str
    footprint: int
    last_used: float
    evictable: bool


def choose_victims(residents: Iterable[Resident], need: int) -> list[str] | None:
    """The least recently used evictable models whose bytes cover `need`; None if all of them would not."""
    chosen: list[str] = []
    freed = 0
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if freed >= need:
            break
        chosen.append(resident.name)
        freed += resident.footprint
    return chosen if freed >= need else None
