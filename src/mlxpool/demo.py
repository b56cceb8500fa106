"""Tiny random-weight models of every supported kind, built offline in about a second.

`mlxpool serve --demo` serves them; the tests use the same builders as fixtures. The weights are random, so
outputs are meaningless: the demo shows routes, formats and the pool's behaviour, not model quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Embeddings place texts with similar meaning close together.",
    "0123456789 , . ; : ! ? ' \" ( ) - _ / @ # $ % & * + = < > [ ] { }",
]


def build_tiny_bert(out: Path) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer (all-MiniLM layout, mean pooling)."""
    from mlx_embeddings.models import bert
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for line in CORPUS for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))})
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]
    vocab += [w for w in words if w not in vocab]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre, decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "model_max_length": 128,
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        },
    )
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
    }
    _seed()
    _save(bert.Model(bert.ModelArgs.from_dict(config)), out, config)
    return out


def build_tiny_qwen3_embedding(out: Path, **shape: Any) -> Path:
    """A 2-layer Qwen3 with a byte-level BPE tokenizer (Qwen3-Embedding layout, last-token pooling).

    `shape` overrides config fields, e.g. Qwen3-Embedding-0.6B's real shape for benchmarks (the tokenizer stays
    tiny; its ids are valid in any larger vocabulary).
    """
    from mlx_embeddings.models import qwen3

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_bpe(CORPUS, ["<|endoftext|>"], vocab_size=320)
    tokenizer.save(str(out / "tokenizer.json"))
    # Right padding: mlx-embeddings returns NaN rows for left-padded Qwen3 batches.
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "padding_side": "right",
            "model_max_length": 128,
        },
    )
    config = {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        **shape,
    }
    _seed()
    _save(qwen3.Model(qwen3.ModelArgs.from_dict(config)), out, config)
    return out


CHAT_TEMPLATE = (
    # ChatML with Qwen's tool-call format, so that mlx-lm finds its json_tools parser.
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\n</tools>\nCall a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\n' + (message.content or '') }}"
    "{% for tool_call in message.tool_calls %}{% set tool_call = tool_call.function %}"
    '{{ \'<tool_call>\n{"name": "\' + tool_call.name + \'", "arguments": \' + (tool_call.arguments | tojson)'
    " + '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_chat(out: Path) -> Path:
    """A 2-layer Qwen3 causal LM with a byte-level BPE tokenizer and a ChatML template (mlx-lm layout)."""
    from mlx_lm.models import qwen3

    out.mkdir(parents=True, exist_ok=True)
    texts = [*CORPUS, "Hello! How can I help you today?", "user assistant system"]
    tokenizer = byte_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], offsets=True)  # ids 0, 1, 2
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    _seed()
    _save(qwen3.Model(qwen3.ModelArgs.from_dict(config)), out, config)  # type: ignore[no-untyped-call]
    _write_json(out / "generation_config.json", {"eos_token_id": 2})
    return out


VLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
VLM_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vlm(out: Path) -> Path:
    """A 2-layer Qwen2-VL (mlx-vlm layout, with its image processor config); images of at most 112x112 pixels
    after resizing, so a few image tokens each."""
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_bpe([*CORPUS, "Describe this image.", "OCR: invoice total 42.00"], VLM_SPECIALS, offsets=True)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "model_max_length": 1024,
            "chat_template": VLM_TEMPLATE,
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": VLM_TEMPLATE})
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "rescale_factor": 1 / 255, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "min_pixels": 56 * 56, "max_pixels": 112 * 112,
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        },
    )  # fmt: skip
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 1024,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},  # sums to head_dim / 2
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "vision_start_token_id": 3,
        "vision_end_token_id": 4,
        "image_token_id": 5,
        "video_token_id": 6,
        "vision_config": {
            "model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "num_heads": 2,
            "mlp_ratio": 2,  # an int: mlx-vlm fails on a float
            "hidden_size": 64, "in_channels": 3, "patch_size": 14, "spatial_patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }  # fmt: skip
    vlm: Any = qwen2_vl  # mlx-vlm's modules are untyped
    args = dict(config)  # from_dict adds `text_config` to it, which update_module_configs reads
    model_config = vlm.ModelConfig.from_dict(args)
    model_config = update_module_configs(model_config, vlm, args, ["text", "vision"])  # type: ignore[no-untyped-call]
    _seed()
    _save(vlm.Model(model_config), out, config)
    return out


def _build_tiny_whisper(out: Path) -> Path:
    from mlxpool.demo_audio import build_tiny_whisper  # demo_audio imports this module's helpers

    return build_tiny_whisper(out)


def _build_tiny_kitten_tts(out: Path) -> Path:
    from mlxpool.demo_audio import build_tiny_kitten_tts

    return build_tiny_kitten_tts(out)


# name -> (kind, builder)
DEMO_MODELS = {
    "demo-embedding": ("embedding", build_tiny_qwen3_embedding),
    "demo-bert": ("embedding", build_tiny_bert),
    "demo-chat": ("chat", build_tiny_chat),
    "demo-vision": ("vision", build_tiny_vlm),
    "demo-ocr": ("ocr", build_tiny_vlm),
    "demo-asr": ("asr", _build_tiny_whisper),
    "demo-tts": ("tts", _build_tiny_kitten_tts),
}


def build_demo(root: Path) -> dict[str, Path]:
    """Build (or reuse) every demo model under `root`; returns name -> directory."""
    built = {}
    for name, (_, build) in DEMO_MODELS.items():
        path = root / name
        built[name] = path if (path / "model.safetensors").exists() else build(path)
    return built


def demo_config(root: Path) -> dict[str, Any]:
    """A config dict (the TOML's shape) serving the demo models, each the default of its kind."""
    paths = build_demo(root)
    models: dict[str, Any] = {}
    for name, (kind, _) in DEMO_MODELS.items():
        first = all(k != kind for k, _ in (DEMO_MODELS[m] for m in models))
        models[name] = {
            "kind": kind,
            "path": str(paths[name]),
            "default": first,
            "memory_reserve": "16MB",
            "preload": first and kind in ("embedding", "asr"),  # the resident kinds; the others load on use
            "aliases": [kind] if first else [],
        }
    return {"models": models}


def byte_bpe(texts: list[str], specials: list[str], vocab_size: int = 384, offsets: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (any byte encodes), `specials` first (ids 0, 1, ...);
    `offsets`: the byte-level post-processor chat tokenizers carry."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if offsets:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _seed() -> None:
    """The same random weights on every build."""
    import mlx.core as mx

    mx.random.seed(0)


def _save(model: Any, out: Path, config: dict[str, Any]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out / "config.json", config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))
