"""Vision-language models over mlx-vlm: chat with images, and OCR.

The same engine as text chat (stop strings, streaming, tools, grammars) on mlx-vlm's `BatchGenerator`. When a
request joins, the worker runs the model's image processor and vision encoder on its images (one bounded step:
images are capped in pixels), then the sequence prefills and decodes in the shared batch like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxpool.config import ModelSpec
from mlxpool.engines.chat import ChatEngine, Sequence
from mlxpool.engines.weights import materialize
from mlxpool.worker import Task, Worker


@dataclass(frozen=True)
class VisionInput:
    text: str
    """The rendered prompt, with the model's image placeholders."""
    images: tuple[Any, ...]
    """Decoded RGB `PIL.Image`s, in the order their placeholders appear."""


class VisionEngine(ChatEngine):
    reuses_prompts = False  # the cache would have to key on images too; mlx-vlm's own (APC) is not wired in
    decodes_alone = False

    def __init__(
        self, model: Any, processor: Any, tokenizer: Any, spec: ModelSpec, config: dict[str, Any], worker: Worker
    ):
        self.processor = processor
        super().__init__(model, tokenizer, spec, config, worker)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt text; the processor's template knows where image placeholders go."""
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        text: str = template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return text

    def _make_generator(self) -> Any:
        from mlx_vlm.generate.ar import BatchGenerator

        return BatchGenerator(
            self.model.language_model,
            self.processor,
            stop_tokens=set(self.tokenizer.eos_token_ids),
            completion_batch_size=self.spec.max_batch_size,
            prefill_step_size=self.spec.prefill_step_size,
            compute_logprobs=False,
        )

    def _insert(self, sequence: Sequence, sampler: Any, processors: list[Any]) -> int:
        from mlx_vlm.utils import prepare_inputs

        media: VisionInput = sequence.media
        inputs = prepare_inputs(  # type: ignore[no-untyped-call]
            self.processor,
            images=list(media.images) or None,
            prompts=media.text,
            image_token_index=getattr(self.model.config, "image_token_index", None),
        )
        ids = inputs.pop("input_ids")
        pixels = inputs.pop("pixel_values", None)
        mask = inputs.pop("attention_mask", None)
        embedded = self.model.get_input_embeddings(ids, pixels, mask=mask, **inputs)
        kwargs = {**inputs, **{k: v for k, v in embedded.to_dict().items() if v is not None}}
        sequence.prompt_tokens = int(ids.shape[1])
        if sequence.params.temperature > 0:  # mlx-vlm samples the whole batch alike: sample per row here
            processors = [*processors, SampleProcessor(sampler)]
        (uid,) = self.generator.insert(
            [ids[0].tolist()],
            max_tokens=[sequence.params.max_tokens],
            prompt_kwargs=[kwargs],
            logits_processors=[processors],
        )
        return int(uid)

    def _next(self) -> list[tuple[int, int, str | None, Any]]:
        _, responses = self.generator.next()
        return [(r.uid, r.token, r.finish_reason, None) for r in responses]

    def _remove(self, uids: list[int]) -> None:
        for uid in uids:
            self.generator.remove(uid)


class SampleProcessor:
    """A logits processor that samples (temperature, top-p, ...) and leaves only the chosen token possible, so
    the batch's greedy pick takes it: per-request sampling on a generator that has one sampler for all."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = self.sampler(logprobs)
        keep = mx.arange(logits.shape[-1]) == chosen.reshape(-1, 1)
        return mx.where(keep, logits, -mx.inf)


def load_vision(spec: ModelSpec, path: Path, worker: Worker) -> Task[VisionEngine]:
    """Load lazily with mlx-vlm (the text side's tokenizer through mlx-lm), then materialize a slice per step."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import load

    model, processor = load(str(path), lazy=True)
    tokenizer = load_tokenizer(path)
    yield
    yield from materialize(model)
    config = json.loads((path / "config.json").read_text())
    return VisionEngine(model, processor, tokenizer, spec, config, worker)
