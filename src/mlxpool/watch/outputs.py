"""The transcript files: Markdown with a short front-matter header, plain text, or SubRip subtitles."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from mlxpool.api.transcripts import to_srt
from mlxpool.engines import transcript
from mlxpool.watch.pipeline import Segment, Transcription

_PLAIN = re.compile(r"[\w./+-](?:[\w./+()-]|:(?=\S)| (?=[^#\s]))*")
"""Values YAML reads back as the same string without quotes (no `: `, ` #`, leading or trailing spaces)."""


def now() -> str:
    """The local date and time, as the headers write it (`2025-06-01T14:03:12+02:00`)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def raw_markdown(source: str, transcription: Transcription, date: str) -> str:
    return front_matter(_fields(source, transcription, date)) + transcription.text + "\n"


def corrected_markdown(source: str, transcription: Transcription, text: str, corrected_by: str, date: str) -> str:
    fields = _fields(source, transcription, date)
    fields["corrected_by"] = corrected_by
    return front_matter(fields) + text + "\n"


def _fields(source: str, t: Transcription, date: str) -> dict[str, str]:
    return {
        "source": source,
        "duration": f"{t.duration:.1f} s",
        "model": t.model,
        "language": t.language or "unknown",
        "date": date,
    }


def front_matter(fields: dict[str, str]) -> str:
    """A YAML header between `---` lines; values that YAML could misread are written as quoted strings."""
    lines = [f"{key}: {value if _PLAIN.fullmatch(value) else json.dumps(value)}" for key, value in fields.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n"


def srt(segments: Sequence[Segment]) -> str:
    """SubRip cues, as the server writes them (`response_format=srt`): numbered from 1, segments without text
    left out, and text that came back from the LLM kept from breaking a cue (no blank lines, no `-->`)."""
    return to_srt([transcript.Segment(s.start, s.end, s.text) for s in segments])
