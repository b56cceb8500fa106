from __future__ import annotations

import threading

from mlxpool.api.offload import INLINE_CHARS, run_off_loop_if_large
from mlxpool.api.schemas import ChatRequest, CompletionRequest


async def test_small_work_runs_on_the_loop_and_large_work_on_a_thread() -> None:
    loop_thread = threading.get_ident()
    assert await run_off_loop_if_large(threading.get_ident, INLINE_CHARS) == loop_thread
    assert await run_off_loop_if_large(threading.get_ident, INLINE_CHARS + 1) != loop_thread


def test_only_requests_with_a_grammar_are_constrained() -> None:
    def chat(**fields: object) -> ChatRequest:
        return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert not chat().constrained
    assert not chat(response_format={"type": "text"}).constrained
    assert not chat(tools=[tool]).constrained  # the model may answer in words: no grammar
    assert chat(response_format={"type": "json_object"}).constrained
    assert chat(tools=[tool], tool_choice="required").constrained
    assert not CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).constrained
