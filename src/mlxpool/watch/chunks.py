"""Cutting a transcript into pieces that fit the correcting model's context, at sentence boundaries."""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_CHUNK_CHARS = 4000
"""About 1,000 tokens of English: the piece, its correction and the prompt fit a 4k-token context."""

_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+|(?<=[\u3002\uff01\uff1f])\s*")  # ellipsis; CJK full stop, ! and ?


def sentences(text: str) -> list[str]:
    """The sentences of `text`: split after `.`, `!`, `?`, `…` (and their CJK forms), stripped."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def chunk_text(text: str, limit: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Whole sentences packed into pieces of at most `limit` characters; a longer sentence is cut between words
    (a longer word, anywhere)."""
    return _packed((part for sentence in sentences(text) for part in _fitted(sentence, limit)), limit)


def _fitted(sentence: str, limit: int) -> list[str]:
    if len(sentence) <= limit:
        return [sentence]
    return _packed((word[i : i + limit] for word in sentence.split() for i in range(0, len(word), limit)), limit)


def _packed(parts: Iterable[str], limit: int) -> list[str]:
    """`parts` (each at most `limit` long), in order, joined with spaces into pieces of at most `limit`."""
    pieces: list[str] = []
    current = ""
    for part in parts:
        if current and len(current) + 1 + len(part) > limit:
            pieces.append(current)
            current = part
        else:
            current = f"{current} {part}" if current else part
    if current:
        pieces.append(current)
    return pieces
