"""Transcript rendering: subtitles parsed back with independent parsers (`srt`, `webvtt-py`), and the JSON shapes."""

from __future__ import annotations

import html
import io
import json
import math
from datetime import timedelta

import pytest
import srt  # type: ignore[import-untyped]
import webvtt

from mlxpool.api.transcripts import Segment, Transcript, Word, render_transcript

SEGMENTS = [
    Segment(0.0, 2.5, " Hello there.", avg_logprob=-0.25, no_speech_prob=0.01, tokens=(1, 2, 3)),
    Segment(2.5, 4.0, " General Kenobi!", seek=0, temperature=0.2, compression_ratio=1.1),
]
TRANSCRIPT = Transcript("Hello there. General Kenobi!", "english", 4.0, SEGMENTS)


def srt_of(segments: list[Segment]) -> list[srt.Subtitle]:
    body, media_type = render_transcript(Transcript("", "english", 0.0, segments), "srt", "transcribe")
    assert isinstance(body, bytes) and media_type.startswith("text/plain")
    return list(srt.parse(body.decode()))


def vtt_of(segments: list[Segment]) -> list[webvtt.Caption]:
    body, media_type = render_transcript(Transcript("", "english", 0.0, segments), "vtt", "transcribe")
    assert isinstance(body, bytes) and media_type.startswith("text/vtt")
    assert body.startswith(b"WEBVTT\n\n")
    return webvtt.from_buffer(io.StringIO(body.decode())).captions


def test_json_and_text() -> None:
    assert render_transcript(TRANSCRIPT, "json", "transcribe") == ({"text": TRANSCRIPT.text}, "application/json")
    body, media_type = render_transcript(TRANSCRIPT, "text", "transcribe")
    assert body == TRANSCRIPT.text.encode() and media_type == "text/plain; charset=utf-8"


def test_srt_round_trips_times_and_texts() -> None:
    subs = srt_of(SEGMENTS)
    assert [s.index for s in subs] == [1, 2]
    assert [(s.start, s.end) for s in subs] == [
        (timedelta(0), timedelta(seconds=2.5)),
        (timedelta(seconds=2.5), timedelta(seconds=4)),
    ]
    assert [s.content for s in subs] == ["Hello there.", "General Kenobi!"]


def test_vtt_round_trips_times_and_texts() -> None:
    cues = vtt_of(SEGMENTS)
    assert [(c.start, c.end) for c in cues] == [("00:00:00.000", "00:00:02.500"), ("00:00:02.500", "00:00:04.000")]
    assert [c.text for c in cues] == ["Hello there.", "General Kenobi!"]


def test_times_past_an_hour_and_rounding_to_milliseconds() -> None:
    segments = [Segment(3725.0004, 3726.9996, "late"), Segment(27 * 3600 + 0.5, 27 * 3600 + 1.25, "next day")]
    subs = srt_of(segments)
    assert [(s.start, s.end) for s in subs] == [
        (timedelta(hours=1, minutes=2, seconds=5), timedelta(hours=1, minutes=2, seconds=7)),
        (timedelta(hours=27, milliseconds=500), timedelta(hours=27, seconds=1, milliseconds=250)),
    ]
    cues = vtt_of(segments)
    assert [(c.start, c.end) for c in cues] == [
        ("01:02:05.000", "01:02:07.000"),
        ("27:00:00.500", "27:00:01.250"),
    ]


def test_no_segments() -> None:
    assert srt_of([]) == []
    assert vtt_of([]) == []
    body, _ = render_transcript(Transcript("", "english", 1.5, []), "verbose_json", "transcribe")
    assert isinstance(body, dict) and body["segments"] == [] and body["text"] == ""


def test_blank_segments_are_left_out_of_subtitles() -> None:
    segments = [Segment(0, 1, "one"), Segment(1, 2, "  \n "), Segment(2, 3, "three")]
    assert [(s.index, s.content) for s in srt_of(segments)] == [(1, "one"), (2, "three")]
    assert [c.text for c in vtt_of(segments)] == ["one", "three"]


@pytest.mark.parametrize(
    ("text", "srt_text", "vtt_text"),
    [
        ("first line\n\n\nsecond line\n", "first line\nsecond line", "first line\nsecond line"),
        ("a <b>bold</b> & co", "a <b>bold</b> & co", "a <b>bold</b> & co"),
        ("arrows --> inside", "arrows -> inside", "arrows --> inside"),
        ("1\n00:00:01,000 --> 00:00:02,000", "1\n00:00:01,000 -> 00:00:02,000", "1\n00:00:01,000 --> 00:00:02,000"),
        ("WEBVTT NOTE café — ☃ 日本語", "WEBVTT NOTE café — ☃ 日本語", "WEBVTT NOTE café — ☃ 日本語"),
    ],
)
def test_special_text_stays_inside_one_cue(text: str, srt_text: str, vtt_text: str) -> None:
    segments = [Segment(0, 1, "before"), Segment(1, 2, text), Segment(2, 3, "after")]
    assert [s.content for s in srt_of(segments)] == ["before", srt_text, "after"]
    # WebVTT cue text escapes &, < and >; webvtt-py hands back the escaped form.
    assert [html.unescape(c.text) for c in vtt_of(segments)] == ["before", vtt_text, "after"]


def test_end_before_start_is_clamped_in_subtitles() -> None:
    (sub,) = srt_of([Segment(5.0, 4.0, "backwards")])
    assert sub.start == sub.end == timedelta(seconds=5)


def test_verbose_json_shape() -> None:
    body, media_type = render_transcript(TRANSCRIPT, "verbose_json", "translate")
    assert media_type == "application/json" and isinstance(body, dict)
    assert {k: body[k] for k in ("task", "language", "duration", "text")} == {
        "task": "translate",
        "language": "english",
        "duration": 4.0,
        "text": TRANSCRIPT.text,
    }
    assert "words" not in body
    assert body["segments"][0] == {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 2.5,
        "text": " Hello there.",
        "tokens": [1, 2, 3],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 0.0,
        "no_speech_prob": 0.01,
    }
    assert [s["id"] for s in body["segments"]] == [0, 1]
    assert body["segments"][1]["temperature"] == 0.2


def test_verbose_json_words_only_when_asked_for() -> None:
    words = [Word(" Hello", 0.0, 0.4), Word(" there.", 0.4, 1.00049)]
    t = Transcript(TRANSCRIPT.text, "english", 4.0, SEGMENTS, words)
    body, _ = render_transcript(t, "verbose_json", "transcribe")
    assert isinstance(body, dict)
    assert body["words"] == [
        {"word": " Hello", "start": 0.0, "end": 0.4},
        {"word": " there.", "start": 0.4, "end": 1.0},
    ]
    body, _ = render_transcript(Transcript("", "english", 1.0, [], []), "verbose_json", "transcribe")
    assert isinstance(body, dict) and body["words"] == []


def test_verbose_json_has_no_nan() -> None:
    t = Transcript("x", "english", 1.0, [Segment(0, 1, "x", avg_logprob=math.nan, compression_ratio=math.inf)])
    body, _ = render_transcript(t, "verbose_json", "transcribe")
    assert isinstance(body, dict)
    segment = json.loads(json.dumps(body, allow_nan=False))["segments"][0]
    assert segment["avg_logprob"] is None and segment["compression_ratio"] is None
