"""Audio files in and out, through PyAV (FFmpeg); no MLX here, so any thread may call it.

`decode_audio_or_raise` reads an upload in any container and codec FFmpeg reads (wav, mp3, m4a/mp4 AAC, flac,
ogg vorbis/opus, webm opus, ...) into float32 mono at the model's rate; a file that yields no audio is a 400.
`AudioEncoder` writes generated speech as one of the `response_format`s of POST /v1/audio/speech
(https://platform.openai.com/docs/api-reference/audio/createSpeech), chunk by chunk when streaming.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Final

import av
import numpy as np
import numpy.typing as npt
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer

from mlxpool.errors import InvalidAudioError

Samples = npt.NDArray[np.float32]

SPEECH_FORMATS: Final = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES: Final[dict[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Opus in an Ogg container
    "aac": "audio/aac",  # ADTS frames, no MP4 container
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",  # raw signed 16-bit little-endian mono at the request's rate, no header
}
# format -> (encoder, muxer); all are in the FFmpeg that PyAV wheels bundle.
_CODECS: Final[dict[str, tuple[str, str]]] = {
    "mp3": ("libmp3lame", "mp3"),
    "opus": ("libopus", "ogg"),
    "aac": ("aac", "adts"),
    "flac": ("flac", "flac"),
    "wav": ("pcm_s16le", "wav"),
    "pcm": ("pcm_s16le", "s16le"),
}
# Ogg writes a page per second by default; shorter pages let a streamed response start sooner.
_STREAMING_OPTIONS: Final[dict[str, dict[str, str]]] = {"ogg": {"page_duration": "100000"}}  # microseconds
# Down-mix to the channels' average, as ffmpeg does into 16-bit (Whisper's loader); into float FFmpeg would
# otherwise weight each channel 0.707, which can exceed 1.0.
_AVERAGE: Final[dict[str, str]] = {"rematrix_maxval": "1.0"}


def decode_audio_or_raise(data: bytes, sample_rate: int, param: str = "file") -> Samples:
    """The first audio stream of `data` as float32 mono samples at `sample_rate`, or a 400 naming `param`.

    Like the ffmpeg CLI, a truncated or damaged file gives the audio that decodes before the damage (corrupt
    packets are skipped); only a file from which no sample decodes is an error.
    """
    if not data:
        raise InvalidAudioError(f"{param}: the file is empty", param=param)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        reason = exc.strerror or exc
        raise InvalidAudioError(f"{param}: not a readable audio file ({reason})", param=param) from exc
    with container:
        if not container.streams.audio:
            raise InvalidAudioError(f"{param}: the file has no audio stream", param=param)
        chunks = list(_to_mono(_decoded_frames(container, container.streams.audio[0]), sample_rate))
    if not any(chunk.size for chunk in chunks):
        raise InvalidAudioError(f"{param}: no audio decodes from the file (empty or truncated)", param=param)
    return np.concatenate(chunks)


def _decoded_frames(container: InputContainer, stream: AudioStream) -> Iterator[AudioFrame]:
    try:
        for packet in container.demux(stream):
            try:
                yield from stream.decode(packet)
            except av.InvalidDataError:
                continue  # a corrupt packet: skip it, as ffmpeg does
    except av.FFmpegError:
        return  # the container breaks off: keep what decoded before


def _to_mono(frames: Iterable[AudioFrame], sample_rate: int) -> Iterator[Samples]:
    """Resample decoded frames; a new resampler when the source's rate or layout changes (joined mp3s)."""
    resampler = _mono_resampler(sample_rate)
    source: tuple[str, str, int] | None = None
    for frame in frames:
        current = (frame.format.name, frame.layout.name, frame.sample_rate)
        if source is not None and current != source:
            yield from _arrays(resampler.resample(None))
            resampler = _mono_resampler(sample_rate)
        source = current
        yield from _arrays(resampler.resample(frame))
    yield from _arrays(resampler.resample(None))


def _mono_resampler(sample_rate: int) -> av.AudioResampler:
    return av.AudioResampler(format="flt", layout="mono", rate=sample_rate, options=_AVERAGE)


def _arrays(frames: list[AudioFrame]) -> Iterator[Samples]:
    for frame in frames:
        yield frame.to_ndarray()[0].astype(np.float32, copy=False)


class _Sink(io.BytesIO):
    """Where the muxer writes. While streaming it claims to be unseekable, so no muxer plans to go back and
    rewrite a header in bytes already sent, and `take` hands out what has been written so far."""

    def __init__(self, streaming: bool) -> None:
        super().__init__()
        self.streaming = streaming

    def seekable(self) -> bool:
        return not self.streaming

    def take(self, final: bool = False) -> bytes:
        if not (self.streaming or final):
            return b""
        data = self.getvalue()
        self.seek(0)
        self.truncate()
        return data


class AudioEncoder:
    """Float32 mono chunks at `sample_rate` in, encoded bytes of one file in `format` (a SPEECH_FORMATS) out.

    Streaming (the default), each `encode` returns the bytes ready so far and nothing is rewritten later: a wav
    header then holds the 0xFFFFFFFF "unknown length" sizes (ffmpeg and most players read such a file to its
    end), and a flac header lacks its sample count and MD5. With `streaming=False`, `encode` returns b"" and
    `finish` the whole file, its header completed (exact wav sizes, flac sample count and MD5, the mp3 LAME tag
    that tells decoders to trim the encoder's padding).

    Codecs that do not take `sample_rate` get the next rate they do (44.1 kHz to 48 kHz for Opus); Ogg Opus
    always decodes at 48 kHz whatever rate it was encoded at.
    """

    def __init__(self, format: str, sample_rate: int, *, streaming: bool = True) -> None:
        if format not in _CODECS:
            raise ValueError(f"unknown speech format {format!r}; one of {', '.join(SPEECH_FORMATS)}")
        codec, muxer = _CODECS[format]
        self.format = format
        self.sample_rate = sample_rate
        self._pts = 0
        self._sink = _Sink(streaming)
        options = _STREAMING_OPTIONS.get(muxer, {}) if streaming else {}
        self._container = av.open(self._sink, mode="w", format=muxer, container_options=options)
        stream = self._container.add_stream(codec, rate=_encoder_rate(codec, sample_rate))
        assert isinstance(stream, AudioStream)
        stream.codec_context.layout = "mono"
        self._stream = stream
        self._container.start_encoding()  # the header, so that even no samples make a valid file

    def encode(self, samples: npt.ArrayLike) -> bytes:
        """Encode one chunk; the bytes the muxer has written so far (b"" when not streaming)."""
        chunk = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        if chunk.size:
            self._container.mux(self._stream.encode(self._frame(chunk)))
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush the encoder and close the file; the remaining bytes (the whole file when not streaming)."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._sink.take(final=True)

    def _frame(self, chunk: npt.NDArray[np.float32]) -> AudioFrame:
        frame = AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = Fraction(1, self.sample_rate)
        frame.pts = self._pts
        self._pts += chunk.shape[1]
        return frame


def _encoder_rate(codec: str, sample_rate: int) -> int:
    rates = av.Codec(codec, "w").audio_rates
    if not rates or sample_rate in rates:
        return sample_rate
    return min((rate for rate in rates if rate > sample_rate), default=max(rates))


def encode_audio(samples: npt.ArrayLike, sample_rate: int, format: str) -> bytes:
    """A whole file in `format` from float32 mono samples at `sample_rate`, its header complete."""
    encoder = AudioEncoder(format, sample_rate, streaming=False)
    encoder.encode(samples)
    return encoder.finish()
