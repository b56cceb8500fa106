"""What a transcription engine produces: segments with times and scores, words when asked for; `api/transcripts.py`
shapes it for each `response_format`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Word:
    """A word and its time span in seconds from the start of the audio."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    """A stretch of decoded text; the scores are Whisper's (models without them keep the defaults)."""

    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    compression_ratio: float = 0.0
    seek: int = 0  # where the segment's window starts, in 10 ms mel frames


@dataclass(frozen=True)
class Transcript:
    """`language` is written as given (OpenAI writes a lower-case English name, e.g. "english");
    `words` is None unless word timings were asked for and the model gives them."""

    text: str
    language: str
    duration: float
    segments: Sequence[Segment]
    words: Sequence[Word] | None = None
