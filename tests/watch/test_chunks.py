from __future__ import annotations

import pytest

from mlxpool.watch.chunks import chunk_text, sentences


def test_sentences_split_after_end_punctuation() -> None:
    text = "Hello there. How are you?  Fine!  Well… 3.5 percent.\nNext line"
    assert sentences(text) == ["Hello there.", "How are you?", "Fine!", "Well…", "3.5 percent.", "Next line"]
    full_stop, bang, question = "\u3002", "\uff01", "\uff1f"  # CJK forms
    cjk = f"你好{full_stop}今天很好{bang}是吗{question}"
    assert sentences(cjk) == [f"你好{full_stop}", f"今天很好{bang}", f"是吗{question}"]
    assert sentences("   ") == []


def test_pieces_are_whole_sentences_within_the_limit() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(50))
    pieces = chunk_text(text, 100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 1
    assert all(p.startswith("Sentence") and p.endswith(".") for p in pieces)
    assert " ".join(pieces) == text


def test_a_sentence_longer_than_the_limit_is_cut_between_words() -> None:
    text = "Short one. " + " ".join(["word"] * 60) + " end. Tail."
    pieces = chunk_text(text, 50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_a_word_longer_than_the_limit_is_cut_anywhere() -> None:
    pieces = chunk_text("x" * 25 + " y.", 10)
    assert pieces == ["x" * 10, "x" * 10, "xxxxx y."]


@pytest.mark.parametrize("text", ["", "  \n "])
def test_nothing_to_correct_gives_no_pieces(text: str) -> None:
    assert chunk_text(text, 100) == []


def test_the_default_fits_a_4k_context() -> None:
    text = "A sentence of about fifty characters, more or less. " * 400
    pieces = chunk_text(text)
    # ~4 characters a token: a piece, its correction (as long) and the prompt stay under 4,096 tokens.
    assert max(len(p) for p in pieces) // 4 * 2 + 200 < 4096
