"""A finished transcription, shaped for OpenAI's `response_format`: json, text, srt, vtt or verbose_json.

OpenAI API reference: Audio → Create transcription (the transcription object, JSON and verbose JSON) and Create
translation. Pure functions: the engine builds a `Transcript`, the route renders it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from mlxpool.engines.transcript import Segment, Transcript, Word

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
Task = Literal["transcribe", "translate"]

JSON = "application/json"
PLAIN = "text/plain; charset=utf-8"
VTT = "text/vtt; charset=utf-8"

__all__ = ["Segment", "Transcript", "Word", "render_transcript"]


def render_transcript(t: Transcript, response_format: ResponseFormat, task: Task) -> tuple[bytes | dict[str, Any], str]:
    """The body (a dict for the JSON formats, to be serialized by the response) and its media type."""
    if response_format == "json":
        return {"text": t.text}, JSON
    if response_format == "verbose_json":
        return verbose_json(t, task), JSON
    if response_format == "srt":
        return to_srt(t.segments).encode(), PLAIN
    if response_format == "vtt":
        return to_vtt(t.segments).encode(), VTT
    return t.text.encode(), PLAIN


def verbose_json(t: Transcript, task: Task) -> dict[str, Any]:
    """OpenAI's verbose JSON: task, language, duration, text, segments, and words when present."""
    body: dict[str, Any] = {
        "task": task,
        "language": t.language,
        "duration": _seconds(t.duration),
        "text": t.text,
        "segments": [_segment_json(i, s) for i, s in enumerate(t.segments)],
    }
    if t.words is not None:
        body["words"] = [{"word": w.word, "start": _seconds(w.start), "end": _seconds(w.end)} for w in t.words]
    return body


def to_srt(segments: Sequence[Segment]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each; empty segments are left out."""
    cues = _cues(segments)
    return "".join(
        f"{n}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text.replace('-->', '->')}\n\n"
        for n, (start, end, text) in enumerate(cues, start=1)
    )


def to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT: a `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`; text escaped (&, <, >)."""
    body = "".join(
        f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{_escape_vtt(text)}\n\n"
        for start, end, text in _cues(segments)
    )
    return "WEBVTT\n\n" + body


def _cues(segments: Sequence[Segment]) -> list[tuple[float, float, str]]:
    """(start, end, text) of the segments that have text, one line per non-blank line of it.

    A blank line would end a cue early, so blank lines go; an end before the start is moved up to the start.
    """
    cues = []
    for s in segments:
        text = "\n".join(line.strip() for line in s.text.splitlines() if line.strip())
        if text:
            start = max(s.start, 0.0)
            cues.append((start, max(s.end, start), text))
    return cues


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(max(seconds, 0.0) * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _escape_vtt(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _segment_json(i: int, s: Segment) -> dict[str, Any]:
    return {
        "id": i,
        "seek": s.seek,
        "start": _seconds(s.start),
        "end": _seconds(s.end),
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": _number(s.temperature),
        "avg_logprob": _number(s.avg_logprob),
        "compression_ratio": _number(s.compression_ratio),
        "no_speech_prob": _number(s.no_speech_prob),
    }


def _seconds(x: float) -> float:
    return round(x, 3)


def _number(x: float) -> float | None:
    """JSON has no NaN or infinity (mlx-audio's Whisper can report a NaN avg_logprob): those become null."""
    return float(x) if math.isfinite(x) else None
