"""Whisper one 30-second window per step: mlx-audio's own long-form loop (`Model.generate`: seek, temperature
fallback, timestamp segments, the previous text as prompt, word timings), cut into steps so other models keep
their turns. The log-mel spectrogram is computed per window, so no step grows with the audio's length."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlxpool.engines.transcript import Segment, Word

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Whisper's fallback ladder: a window decoded too repetitively or too unsure is decoded again hotter."""


@dataclass(frozen=True)
class Window:
    segments: list[Segment]
    words: list[Word]
    language: str
    """The language code decoding used (detected on the first window when not given)."""


def float32_whisper(model: Any) -> None:
    """mlx-audio builds Whisper in float16, which the CPU backend runs slowly: cast it all to float32."""
    model.set_dtype(mx.float32)
    model.dtype = mx.float32
    model.encoder._positional_embedding = model.encoder._positional_embedding.astype(mx.float32)
    model.decoder._mask = model.decoder._mask.astype(mx.float32)


def is_whisper(model: Any) -> bool:
    return hasattr(model, "decode") and hasattr(model, "get_tokenizer") and hasattr(model, "dims")


def whisper_windows(
    model: Any,
    audio: np.ndarray,
    *,
    language: str | None,
    task: str,
    prompt: str | None,
    temperature: float | None,
    words: bool,
) -> Iterator[Window]:
    """Decode `audio` (16 kHz mono float32) a window per `next()`."""
    from mlx_audio.stt.models.whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE

    frames = len(audio) // HOP_LENGTH
    stride = N_FRAMES // model.dims.n_audio_ctx
    precision = stride * HOP_LENGTH / SAMPLE_RATE
    temperatures = TEMPERATURES if temperature is None else (temperature,)
    seek, last_speech = 0, 0.0
    tokenizer, history = None, []
    while seek < frames:
        size = min(N_FRAMES, frames - seek)
        mel = _window_mel(model, audio[seek * HOP_LENGTH : seek * HOP_LENGTH + N_SAMPLES], size)
        if tokenizer is None:
            language = model._detect_language(mel, language)
            tokenizer = model.get_tokenizer(language=language, task=task)
            history = list(tokenizer.encode(" " + prompt.strip())) if prompt else []
        options = {"language": language, "task": task, "prompt": history, "fp16": model.dtype == mx.float16}
        result = _decode_with_fallback(model, mel, temperatures, options)
        offset = seek * HOP_LENGTH / SAMPLE_RATE
        if result.no_speech_prob > 0.6 and not result.avg_logprob > -1.0:  # silence: nothing to keep
            seek += size
            yield Window([], [], str(language))
            continue
        raw, next_seek, single_end = _split(result, tokenizer, seek, size, offset, precision, stride)
        found: list[Word] = []
        if words:
            found = _time_words(model, tokenizer, mel, raw, size, last_speech)
            if found:
                last_speech = found[-1].end
                if not single_end and (shift := round((found[-1].end - offset) * 100)) > 0:
                    next_seek = seek + shift  # go on after the last word, as Whisper does
        seek = next_seek
        kept = [s for s in raw if s["start"] != s["end"] and s["text"].strip()]
        history.extend(t for s in kept for t in s["tokens"])
        yield Window([_segment(s, result) for s in kept], found, str(language))


def _window_mel(model: Any, samples: np.ndarray, frames: int) -> mx.array:
    """The window's log-mel spectrogram: its first `frames` frames, then zeros, as mlx-audio's loop pads it."""
    from mlx_audio.stt.models.whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

    mel = log_mel_spectrogram(mx.array(samples), n_mels=model.dims.n_mels, padding=N_SAMPLES)
    window: mx.array = pad_or_trim(mel[:frames], N_FRAMES, axis=-2).astype(model.dtype)
    return window


def _decode_with_fallback(model: Any, mel: mx.array, temperatures: tuple[float, ...], options: dict[str, Any]) -> Any:
    from mlx_audio.stt.models.whisper.decoding import DecodingOptions

    for t in temperatures:
        result = model.decode(mel, DecodingOptions(**options, temperature=t))
        too_bad = result.compression_ratio > 2.4 or result.avg_logprob < -1.0
        if result.no_speech_prob > 0.6 and result.avg_logprob < -1.0:
            too_bad = False  # silence, not a failed decode
        if not too_bad:
            break
    return result


def _split(
    result: Any, tokenizer: Any, seek: int, size: int, offset: float, precision: float, stride: int
) -> tuple[list[dict[str, Any]], int, bool]:
    """Segments between timestamp tokens (as dicts, for mlx-audio's word timing), where the next window starts,
    and whether the window ended on a lone timestamp (its speech ended inside it)."""
    tokens = np.array(result.tokens)
    begin = tokenizer.timestamp_begin
    stamps = tokens >= begin
    single_end = stamps[-2:].tolist() == [False, True]
    cuts = (np.where(stamps[:-1] & stamps[1:])[0] + 1).tolist()

    def segment(start: float, end: float, part: np.ndarray) -> dict[str, Any]:
        ids = part.tolist()
        text = tokenizer.decode([t for t in ids if t < tokenizer.eot])
        return {"seek": seek, "start": start, "end": end, "text": text, "tokens": ids}

    if not cuts:
        duration = size * precision / stride
        ends = tokens[stamps]
        if len(ends) and ends[-1] != begin:
            duration = (ends[-1] - begin) * precision
        return [segment(offset, offset + duration, tokens)], seek + size, single_end
    if single_end:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        part = tokens[last:cut]
        segments.append(segment(offset + (part[0] - begin) * precision, offset + (part[-1] - begin) * precision, part))
        last = cut
    return segments, seek + size if single_end else seek + int(tokens[last - 1] - begin) * stride, single_end


def _time_words(
    model: Any, tokenizer: Any, mel: mx.array, raw: list[dict[str, Any]], size: int, last_speech: float
) -> list[Word]:
    """Word timings for the window's segments (mlx-audio's cross-attention alignment)."""
    from mlx_audio.stt.models.whisper.timing import add_word_timestamps

    add_word_timestamps(
        segments=raw, model=model, tokenizer=tokenizer, mel=mel, num_frames=size, last_speech_timestamp=last_speech
    )
    return [Word(w["word"], float(w["start"]), float(w["end"])) for s in raw for w in s.get("words", [])]


def _segment(raw: dict[str, Any], result: Any) -> Segment:
    return Segment(
        start=float(raw["start"]),
        end=float(raw["end"]),
        text=str(raw["text"]),
        avg_logprob=float(result.avg_logprob),
        no_speech_prob=float(result.no_speech_prob),
        tokens=tuple(raw["tokens"]),
        temperature=float(result.temperature),
        compression_ratio=float(result.compression_ratio),
        seek=int(raw["seek"]),
    )
