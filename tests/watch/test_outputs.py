from __future__ import annotations

from datetime import timedelta

import srt  # type: ignore[import-untyped]

from mlxpool.watch import outputs
from mlxpool.watch.pipeline import Segment, Transcription

HEARD = Transcription(text="hello there", duration=65.25, language="english", model="demo-asr")


def test_raw_markdown_has_a_short_header_then_the_text() -> None:
    text = outputs.raw_markdown("talk: part 1.wav", HEARD, "2025-06-01T14:03:12+02:00")
    assert text == (
        '---\nsource: "talk: part 1.wav"\nduration: 65.2 s\nmodel: demo-asr\nlanguage: english\n'
        "date: 2025-06-01T14:03:12+02:00\n---\n\nhello there\n"
    )


def test_corrected_markdown_names_the_correcting_model() -> None:
    text = outputs.corrected_markdown("talk.wav", HEARD, "Hello there.", "smol", "2025-06-01")
    assert "\ncorrected_by: smol\n---\n\nHello there.\n" in text and text.startswith("---\nsource: talk.wav\n")


def test_values_yaml_could_misread_are_quoted() -> None:
    header = outputs.front_matter({"a": "x #y", "b": " lead", "c": "", "d": "org/model-4bit", "e": "a:b"})
    assert header == '---\na: "x #y"\nb: " lead"\nc: ""\nd: org/model-4bit\ne: a:b\n---\n\n'


def test_srt_reads_back_with_an_independent_parser() -> None:
    segments = [
        Segment(start=0.0, end=1.5, text=" Hello."),
        Segment(start=1.5, end=1.5, text="  "),  # nothing said: no cue
        Segment(start=3661.25, end=3600.0, text="Late."),  # an end before the start moves up to it
        Segment(start=3700.0, end=3701.0, text="A corrected\n\nline --> two"),  # as an LLM may send it back
    ]
    cues = list(srt.parse(outputs.srt(segments)))
    assert [(c.index, c.start, c.end, c.content) for c in cues] == [
        (1, timedelta(0), timedelta(seconds=1.5), "Hello."),
        (2, timedelta(seconds=3661.25), timedelta(seconds=3661.25), "Late."),
        (3, timedelta(seconds=3700), timedelta(seconds=3701), "A corrected\nline -> two"),
    ]
