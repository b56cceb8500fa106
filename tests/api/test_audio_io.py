from __future__ import annotations

import io
import wave
from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
import pytest
from av.audio.stream import AudioStream

from mlxpool.api.audio_io import MEDIA_TYPES, SPEECH_FORMATS, AudioEncoder, decode_audio_or_raise, encode_audio
from mlxpool.errors import InvalidAudioError

TONE_RATE = 44100
SPEECH_RATE = 24000
# name -> (muxer, encoder): every input container the transcription routes accept.
INPUTS = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "m4a": ("ipod", "aac"),
    "flac": ("flac", "flac"),
    "ogg": ("ogg", "vorbis"),
    "opus": ("ogg", "libopus"),
    "webm": ("webm", "libopus"),
    "mp4": ("mp4", "aac"),
    "mpga": ("mp2", "mp2"),
}


def tone(rate: int, channels: int, seconds: float = 1.5) -> npt.NDArray[np.float32]:
    """A 440 Hz sine, amplitude 0.5 in the first channel and 0.3 in the others."""
    t = np.arange(int(rate * seconds)) / rate
    wave_ = np.sin(2 * np.pi * 440 * t)
    return np.stack([(0.5 if c == 0 else 0.3) * wave_ for c in range(channels)]).astype(np.float32)


def write(muxer: str, codec: str, samples: npt.NDArray[np.float32], rate: int) -> bytes:
    """`samples` (channels x n) as a file written by FFmpeg."""
    buf = io.BytesIO()
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(buf, mode="w", format=muxer) as container:
        codec_rate = 48000 if codec == "libopus" else rate  # libopus takes no 44.1 kHz
        stream = container.add_stream(codec, rate=codec_rate, options={"strict": "experimental"})
        assert isinstance(stream, AudioStream)
        stream.codec_context.layout = layout
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def video_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=1)
        stream.width = stream.height = 16
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def decoded(data: bytes) -> tuple[int, float]:
    """The sample rate and duration in seconds that PyAV decodes from `data`."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.sample_rate, samples / stream.sample_rate


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    stereo = tone(TONE_RATE, 2)
    return {name: write(muxer, codec, stereo, TONE_RATE) for name, (muxer, codec) in INPUTS.items()}


@pytest.fixture(scope="module")
def speech() -> npt.NDArray[np.float32]:
    return tone(SPEECH_RATE, 1).reshape(-1)


@pytest.mark.parametrize("name", INPUTS)
def test_decodes_every_input_container_to_mono_16k(inputs: dict[str, bytes], name: str) -> None:
    samples = decode_audio_or_raise(inputs[name], 16000)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert len(samples) / 16000 == pytest.approx(1.5, rel=0.05)
    assert float(np.sqrt(np.mean(samples**2))) > 0.1


def test_down_mix_averages_the_channels(inputs: dict[str, bytes]) -> None:
    samples = decode_audio_or_raise(inputs["wav"], 16000)
    assert float(np.abs(samples).max()) == pytest.approx((0.5 + 0.3) / 2, abs=0.01)


def test_resamples_8khz_mono_up_to_16khz() -> None:
    data = write("wav", "pcm_s16le", tone(8000, 1), 8000)
    samples = decode_audio_or_raise(data, 16000)
    assert len(samples) == pytest.approx(24000, abs=16)


def test_truncated_file_gives_the_audio_before_the_cut(inputs: dict[str, bytes]) -> None:
    data = inputs["mp3"]
    samples = decode_audio_or_raise(data[: len(data) // 2], 16000)
    assert len(samples) / 16000 == pytest.approx(0.75, abs=0.1)


BAD_FILES = {
    "empty": (b"", "the file is empty"),
    "random": (np.random.default_rng(0).bytes(4096), "not a readable audio file"),
    "text": (b"This is a text file, not audio.\n" * 64, "not a readable audio file"),
    "silent wav": (encode_audio(np.zeros(0, np.float32), 16000, "wav"), "no audio decodes"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_are_invalid_audio(name: str) -> None:
    data, message = BAD_FILES[name]
    with pytest.raises(InvalidAudioError, match=message) as caught:
        decode_audio_or_raise(data, 16000, param="file")
    assert caught.value.param == "file"
    assert caught.value.code == "invalid_audio"
    assert caught.value.status == 400


def test_video_only_container_has_no_audio_stream() -> None:
    with pytest.raises(InvalidAudioError, match="no audio stream") as caught:
        decode_audio_or_raise(video_only(), 16000, param="audio")
    assert caught.value.param == "audio"


@pytest.mark.parametrize("name", INPUTS)
def test_file_cut_to_100_bytes_is_invalid_audio(inputs: dict[str, bytes], name: str) -> None:
    with pytest.raises(InvalidAudioError) as caught:
        decode_audio_or_raise(inputs[name][:100], 16000)
    assert caught.value.param == "file"


def test_media_types_cover_every_speech_format() -> None:
    assert set(MEDIA_TYPES) == set(SPEECH_FORMATS)


@pytest.mark.parametrize("format", [f for f in SPEECH_FORMATS if f != "pcm"])
def test_encode_audio_decodes_back(speech: npt.NDArray[np.float32], format: str) -> None:
    rate, seconds = decoded(encode_audio(speech, SPEECH_RATE, format))
    # Ogg Opus always decodes at 48 kHz; ADTS cannot mark AAC's 1024 priming samples, so it runs ~0.08 s long.
    assert rate == (48000 if format == "opus" else SPEECH_RATE)
    assert seconds == pytest.approx(1.5, abs=0.1)


def test_pcm_is_raw_16_bit_little_endian(speech: npt.NDArray[np.float32]) -> None:
    data = encode_audio(speech, SPEECH_RATE, "pcm")
    assert len(data) == 2 * len(speech)
    pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
    assert np.allclose(pcm, speech, atol=1e-3)


def test_whole_wav_has_exact_sizes(speech: npt.NDArray[np.float32]) -> None:
    with wave.open(io.BytesIO(encode_audio(speech, SPEECH_RATE, "wav"))) as reader:
        assert (reader.getnframes(), reader.getframerate(), reader.getnchannels()) == (len(speech), SPEECH_RATE, 1)


def test_streamed_wav_declares_unknown_length(speech: npt.NDArray[np.float32]) -> None:
    encoder = AudioEncoder("wav", SPEECH_RATE)
    data = encoder.encode(speech) + encoder.finish()
    assert data[4:8] == b"\xff\xff\xff\xff"
    assert decoded(data) == (SPEECH_RATE, 1.5)


@pytest.mark.parametrize("format", SPEECH_FORMATS)
def test_encoder_streams_chunk_by_chunk(speech: npt.NDArray[np.float32], format: str) -> None:
    encoder = AudioEncoder(format, SPEECH_RATE)
    pieces = [encoder.encode(chunk) for chunk in np.array_split(speech, 10)]
    pieces.append(encoder.finish())
    assert sum(1 for piece in pieces[:-1] if piece) > 1
    data = b"".join(pieces)
    seconds = len(data) / 2 / SPEECH_RATE if format == "pcm" else decoded(data)[1]
    assert seconds == pytest.approx(1.5, abs=0.1)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown speech format"):
        AudioEncoder("ogg", SPEECH_RATE)


def test_format_change_mid_stream_decodes_both_parts() -> None:
    # Two mp3s back to back: the decoder switches from 44.1 kHz stereo to 22.05 kHz mono (one corrupt packet
    # between them is skipped).
    first = write("mp3", "libmp3lame", tone(44100, 2), 44100)
    second = write("mp3", "libmp3lame", tone(22050, 1), 22050)
    samples = decode_audio_or_raise(first + second, 16000)
    assert len(samples) / 16000 == pytest.approx(3.0, rel=0.05)
