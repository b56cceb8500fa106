"""One audio file through the server: transcription (/v1/audio/transcriptions), then correction of each piece
of the transcript by a chat model (/v1/chat/completions)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel

from mlxpool.watch.chunks import DEFAULT_CHUNK_CHARS, chunk_text
from mlxpool.watch.client import ServerClient, ServerError

DEFAULT_PROMPT = (
    "You correct automatic speech-recognition transcripts. Fix misheard words, spelling, punctuation, "
    "capitalization and sentence breaks. Keep the speaker's words, language and meaning: do not summarize, "
    "translate, answer, add or leave out anything. Reply with the corrected text only."
)


@dataclass(frozen=True)
class Options:
    """What to ask the server for; the CLI fills it from flags and environment variables."""

    asr_model: str = "whisper-1"
    llm_model: str = "gpt-4o"
    language: str | None = None
    """A language code such as `en`; None: the ASR model detects it."""
    prompt: str = DEFAULT_PROMPT
    """The correcting model's system message."""
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    """The longest piece of transcript corrected in one request, in characters."""
    max_tokens: int | None = None
    """The correction's length limit per piece; None: about twice the piece's tokens."""


class Segment(BaseModel):
    start: float
    end: float
    text: str


class Transcription(BaseModel):
    """What the ASR model heard; `model` and `language` as the server names them (`demo-asr`, `english`)."""

    text: str
    duration: float
    language: str
    model: str
    segments: list[Segment] = []


def transcribe(client: ServerClient, audio: Path, options: Options) -> Transcription:
    form = {"model": options.asr_model, "response_format": "verbose_json"}
    if options.language:
        form["language"] = options.language
    body = client.post_form("/v1/audio/transcriptions", form, {"file": (audio.name, audio.read_bytes())})
    return Transcription(
        text=body["text"].strip(),
        duration=float(body.get("duration") or 0.0),
        language=body.get("language") or options.language or "",
        model=model_id(client, options.asr_model),
        segments=[Segment(start=s["start"], end=s["end"], text=s["text"]) for s in body.get("segments", [])],
    )


def model_id(client: ServerClient, name: str) -> str:
    """The server's name for the model that `name` (an alias, `whisper-1`...) resolves to."""
    try:
        return str(client.get_json(f"/v1/models/{quote(name, safe='')}")["id"])
    except ServerError:
        return name  # a server that cannot look it up still served it under this name


def correct(client: ServerClient, text: str, options: Options) -> tuple[str, str]:
    """`text` corrected a piece at a time, and the model that corrected it."""
    answers = [correct_piece(client, piece, options) for piece in chunk_text(text, options.chunk_chars)]
    return " ".join(t for t, _ in answers), answers[-1][1] if answers else options.llm_model


def correct_piece(client: ServerClient, piece: str, options: Options) -> tuple[str, str]:
    """The corrected piece (reasoning removed) and the model that wrote it; the piece itself if the answer is
    empty."""
    body = {
        "model": options.llm_model,
        "messages": [{"role": "system", "content": options.prompt}, {"role": "user", "content": piece}],
        "temperature": 0,
        "max_tokens": options.max_tokens or len(piece) // 2 + 64,
        # A correction needs no reasoning, which would only use up max_tokens; mlxpool passes this to the
        # chat template (templates without the switch ignore it).
        "chat_template_kwargs": {"enable_thinking": False},
    }
    reply = client.post_json("/v1/chat/completions", body)
    text = strip_reasoning(reply["choices"][0]["message"].get("content") or "")
    return text or piece, str(reply.get("model") or options.llm_model)


_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """`text` without `<think>...</think>` blocks (an unclosed one runs to the end), nor anything before a
    lone `</think>` (the template opened the block in the prompt)."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()
