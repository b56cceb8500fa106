"""Reasoning models think inside `<think>...</think>` before they answer: that text goes to
`reasoning_content`, never into `content`."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """Splits streamed text into (reasoning, content) pieces, with tags that may arrive cut across deltas.

    Thinking starts either in the prompt (the chat template ended it with `<think>`) or with `<think>` as the
    first thing the model writes; a `<think>` later in an answer is plain content.
    """

    def __init__(self, thinking: bool = False):
        self.state = "thinking" if thinking else "start"
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(OPEN):
                self.state, self.buffer = "thinking", head[len(OPEN) :]
            elif OPEN.startswith(head) and not final:
                return "", ""  # maybe the start of <think>: wait for more
            else:
                self.state = "content"
        if self.state == "thinking":
            at = self.buffer.find(CLOSE)
            if at < 0:
                keep = 0 if final else partial_tag(self.buffer, CLOSE)
                reasoning, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
                return reasoning, ""
            reasoning, self.buffer = self.buffer[:at], self.buffer[at + len(CLOSE) :]
            self.state = "answer"
        if self.state == "answer":  # the blank lines between the thought and the answer belong to neither
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return reasoning, ""
            self.state = "content"
        content, self.buffer = self.buffer, ""
        return reasoning, content


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def prompt_opens_thinking(prompt: str) -> bool:
    return prompt.rstrip().endswith(OPEN)
