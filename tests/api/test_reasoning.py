from __future__ import annotations

import pytest

from mlxpool.api.reasoning import ReasoningSplitter, prompt_opens_thinking


def split(pieces: list[str], thinking: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(thinking)
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        r, c = splitter.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>plan it</think>\n\nParis."],
        ["<th", "ink>plan", " it</th", "ink>", "\n\nPar", "is."],
        ["\n<think>", "plan it", "</think>Paris."],
    ],
)
def test_thinking_goes_to_reasoning_and_never_to_content(pieces: list[str]) -> None:
    assert split(pieces) == ("plan it", "Paris.")


def test_thinking_opened_by_the_prompt() -> None:
    assert split(["plan it</thi", "nk>Paris."], thinking=True) == ("plan it", "Paris.")


def test_no_thinking_is_all_content_even_with_a_late_tag() -> None:
    assert split(["Paris. ", "<think>not a thought</think>"]) == ("", "Paris. <think>not a thought</think>")


def test_an_unfinished_thought_stays_reasoning() -> None:
    assert split(["<think>hmm, lengthy"]) == ("hmm, lengthy", "")


def test_a_lone_start_that_is_not_a_tag_is_content() -> None:
    assert split(["<", "b>bold</b>"]) == ("", "<b>bold</b>")


def test_prompt_ending_in_think_opens_thinking() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
