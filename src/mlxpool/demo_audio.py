"""Tiny random-weight speech models (Whisper for transcription, KittenTTS for speech), built offline in a second.

Like `mlxpool.demo`, they exercise routes, formats and streaming, not quality: Whisper emits gibberish with
arbitrary timestamps (even past the end of the audio) and KittenTTS a fixed noisy spectrum, but every stage of
both pipelines runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxpool.demo import _save, _seed, _write_json, byte_bpe

WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]  # fmt: skip
WHISPER_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a speech recognition test.",
    "0123456789 , . ; : ! ? ' \" ( ) -",
]


def build_tiny_whisper(out: Path) -> Path:
    """A 2-layer English-only Whisper (mlx-audio layout: MLX weight names, HF tokenizer and feature extractor).

    The encoder keeps Whisper's fixed input (80 mel bins, 1500 positions = one 30 s window); the decoder is short
    (64 positions), enough for a few segments per window.
    """
    import mlx.core as mx
    from mlx_audio.stt.models.whisper.whisper import Model, ModelDimensions

    out.mkdir(parents=True, exist_ok=True)
    sot, eot, vocab_size = _write_whisper_tokenizer(out)
    config = {
        "model_type": "whisper",
        "n_mels": 80,
        "n_audio_ctx": 1500,
        "n_audio_state": 32,
        "n_audio_head": 2,
        "n_audio_layer": 2,
        "n_vocab": vocab_size,  # under 51865: mlx-audio treats the model as English-only
        "n_text_ctx": 64,
        "n_text_state": 32,
        "n_text_head": 2,
        "n_text_layer": 2,
    }
    _write_json(
        out / "generation_config.json",
        {
            "decoder_start_token_id": sot,
            "eos_token_id": eot,
            "pad_token_id": eot,
            "is_multilingual": False,
            "alignment_heads": [[1, 0], [1, 1]],  # read by mlx-audio for word timestamps
        },
    )
    _write_json(out / "preprocessor_config.json", _whisper_feature_extractor())
    _seed()
    _save(Model(ModelDimensions.from_dict(config), dtype=mx.float32), out, config)
    return out


def _write_whisper_tokenizer(out: Path) -> tuple[int, int, int]:
    """A byte-level BPE, then Whisper's special tokens, then its 1501 timestamp tokens <|0.00|>..<|30.00|>.

    The order is Whisper's own: mlx-audio takes ids below <|endoftext|> as text and ids from <|0.00|> on as
    timestamps.

    Returns the ids of <|startoftranscript|> and <|endoftext|>, and the vocabulary size.
    """
    from tokenizers import AddedToken

    tokenizer = byte_bpe(WHISPER_CORPUS, [], vocab_size=320)  # text first: mlx-audio reads ids < eot as text
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in WHISPER_SPECIALS])
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "WhisperTokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 64,
            "clean_up_tokenization_spaces": False,
        },
    )
    ids = tokenizer.get_vocab(with_added_tokens=True)
    return ids["<|startoftranscript|>"], ids["<|endoftext|>"], tokenizer.get_vocab_size(with_added_tokens=True)


def _whisper_feature_extractor() -> dict[str, Any]:
    """Whisper's feature extractor settings: 16 kHz, 80 mel bins, 30 s windows of 10 ms frames."""
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": 80,
        "sampling_rate": 16000,
        "hop_length": 160,
        "chunk_length": 30,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


KITTEN_VOICE = "expr-voice-5-m"  # mlx-audio's default KittenTTS voice

KITTEN_CONFIG = {
    "model_type": "kitten_tts",
    "n_token": 178,  # KittenTTS's symbol table
    "style_dim": 128,  # fixed by the code: voices are 2 x 128 wide
    "hidden_dim": 32,
    "max_conv_dim": 32,
    "decoder_out_dim": 32,
    "asr_res_dim": 16,
    "n_layer": 1,
    "max_dur": 4,  # frames per phoneme at most: keeps the random durations (and tests) short
    "n_mels": 80,
    "text_encoder_kernel_size": 5,
    "sample_rate": 24000,
    "voices_path": "voices.npz",
    "plbert": {
        "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64,
        "max_position_embeddings": 128, "embedding_size": 16, "inner_group_num": 1, "num_hidden_groups": 1,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    },
    # upsample rates x hop (10 * 6 * 5 = 300) must equal the 24 kHz / 80 Hz frame ratio
    "istftnet": {
        "upsample_rates": [10, 6], "upsample_kernel_sizes": [20, 12], "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]], "gen_istft_n_fft": 20,
        "gen_istft_hop_size": 5,
    },
}  # fmt: skip


def build_tiny_kitten_tts(out: Path) -> Path:
    """A KittenTTS (StyleTTS2 family, 24 kHz) with a 2-layer ALBERT and one voice, `KITTEN_VOICE`.

    Synthesis phonemizes with espeak-ng through the `phonemizer` module (pip package `phonemizer-fork`).
    """
    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.models.kitten_tts.kitten_tts import Model, ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    _seed()
    model = Model(ModelConfig.from_dict(KITTEN_CONFIG))
    # The vocoder exp()s its predicted log-magnitudes, which overflow to NaN with random weights. A zero gain on
    # the last (weight-normed) conv and a random bias give a fixed, finite, non-silent spectrum instead.
    post = model.decoder.generator.conv_post
    post.weight_g = mx.zeros(post.weight_g.shape)
    post.bias = mx.random.normal(post.bias.shape)
    _save(model, out, KITTEN_CONFIG)
    # One style vector (2 x style_dim) per input length, as in the real voices.npz.
    rng = np.random.default_rng(0)
    np.savez(out / "voices.npz", allow_pickle=False, **{KITTEN_VOICE: rng.normal(0, 0.1, (64, 256)).astype(np.float32)})
    return out
