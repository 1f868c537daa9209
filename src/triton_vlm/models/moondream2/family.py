"""``Moondream2Family``: the adapter that loads, prompts and steps moondream2 for the shared runtime."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from triton_vlm.chat import Chat
from triton_vlm.errors import InvalidInputError
from triton_vlm.images import image_list
from triton_vlm.models.base import ModelFamily
from triton_vlm.models.generation import (
    CancelProbes,
    GenerationOutput,
    Prompt,
    RowImages,
    generate_batch,
    prompt_text,
)
from triton_vlm.models.moondream2.config import MoondreamConfig, tiny_config
from triton_vlm.models.moondream2.locate import locate
from triton_vlm.models.moondream2.model import Moondream2Model
from triton_vlm.models.moondream2.processor import Moondream2Processor
from triton_vlm.models.moondream2.tasks import CAPTION_LENGTHS, parse_task
from triton_vlm.models.moondream2.tokenizer import (
    Moondream2Tokenizer,
    detect_generation,
    load_tokenizer,
    starmie_template_ids,
    train_tiny_tokenizer,
)
from triton_vlm.models.moondream2.weights import (
    load_official_state_dict,
    read_checkpoint_config,
    read_official_tensors,
    resolve_checkpoint,
    write_checkpoint,
)
from triton_vlm.sampling import SamplingParams

log = logging.getLogger("triton_vlm")

DEFAULT_REVISION = "2025-06-21"


class Moondream2Family(ModelFamily):
    name = "moondream2"
    default_hf_model_id = "vikhyatk/moondream2"
    architectures = ("HfMoondream",)  # what its config.json names (the 2025 releases)
    supported = True
    # The tokenizer turns these into control tokens even inside user text.
    reserved_prompt_tokens = ("<|endoftext|>", "<|md_reserved_")
    tasks = ("query", "caption", *(f"caption:{n}" for n in CAPTION_LENGTHS), "detect", "point")
    # Released and run by the reference in bfloat16; float16's narrower range is not what it was tested in.
    auto_cuda_dtype = "bfloat16"
    # The query task (the default) runs on the engine; captions and region tasks on the batched loop.
    engine_adapter_class = ("triton_vlm.models.moondream2.engine_adapter", "Moondream2EngineAdapter")
    # Every prompt is [BOS, the image's slots, text]: one image, always (its prefix attends both ways).
    max_images_per_request = 1
    min_images_per_request = 1
    # Its own tokenizers.Tokenizer and its own batched loop: no grammar mask there (yet).
    supports_response_format = False

    def model_class(self) -> type[Any]:
        return Moondream2Model

    # -- loading -----------------------------------------------------------------------------------------
    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        """Weights from ``model.safetensors`` (official names), the tokenizer the reference code would use;
        never any code from the checkpoint, whatever ``trust_remote_code`` says."""
        if trust_remote_code:
            log.info("moondream2: trust_remote_code is ignored; this implementation runs no checkpoint code")
        checkpoint = resolve_checkpoint(source, revision=revision, local_files_only=local_files_only)
        generation = detect_generation(checkpoint, revision)
        config = MoondreamConfig.from_dict(read_checkpoint_config(checkpoint), generation.defaults)
        tokenizer = load_tokenizer(checkpoint, generation, config.tokenizer, model_id=source,
                                   local_files_only=local_files_only)
        with torch.device("meta"):
            model = Moondream2Model(config)
        tensors = read_official_tensors(checkpoint, dtype=dtype, device=device, model_id=source)
        load_official_state_dict(model, tensors, model_id=source)
        model.suppressed_decode_ids = tuple(
            getattr(config.tokenizer, field) for field in generation.suppressed_in_decode
            if getattr(config.tokenizer, field) is not None)
        log.info("moondream2 %s: %s tokenizer generation", source, generation.name)
        return model.eval(), Moondream2Processor(tokenizer, config, generation)

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        write_random_checkpoint(path)

    # -- requests ----------------------------------------------------------------------------------------
    def normalize_task(self, task: str | None) -> str | None:
        return parse_task(task).name if task and task.strip() else None

    def prompt_required(self, task: str | None) -> bool:
        return parse_task(task).needs_prompt

    def render_prompt(self, processor: Moondream2Processor, prompt: str) -> list[int]:
        return self.render_request(processor, prompt, None)

    def render_request(self, processor: Moondream2Processor, prompt: str, task: str | None) -> list[int]:
        return processor.prompt_tokens(parse_task(task), prompt)

    def render_chat(self, processor: Moondream2Processor, chat: Chat) -> list[int]:
        return processor.chat_tokens(chat)

    def render_input(self, processor: Moondream2Processor, prompt: Prompt, task: str | None = None) -> Any:
        if isinstance(prompt, Chat) and parse_task(task).kind != "query":
            # Captions, detect and point are no conversation: they take the last question (an object's name).
            return self.render_request(processor, prompt.question, task)
        return super().render_input(processor, prompt, task)

    def encode(self, processor: Moondream2Processor, images: Sequence[RowImages],
               texts: list[Any]) -> dict[str, torch.Tensor]:
        return processor([image_list(row)[0] for row in images], texts)

    def generate(self, model: Moondream2Model, processor: Moondream2Processor, images: Sequence[RowImages],
                 prompts: Sequence[Prompt], params: list[SamplingParams],
                 tasks: list[str | None], cancelled: CancelProbes | None = None) -> list[GenerationOutput]:
        """Text tasks (query, caption) share one batched decode; detect and point run the region loop."""
        parsed = [parse_task(t) for t in tasks]
        limit = model.config.text.max_context
        for task, prompt, p in zip(parsed, prompts, params, strict=True):
            used = model.prefix_length + len(self.render_input(processor, prompt, task.name))
            if not task.is_region and used + p.max_tokens > limit:
                raise InvalidInputError(f"max_tokens: {p.max_tokens} new tokens after {used} prompt tokens exceed "
                                        f"the context of {limit} tokens; ask for at most {limit - used}",
                                        param="max_tokens")
        results: list[GenerationOutput | None] = [None] * len(prompts)
        text_rows = [i for i, t in enumerate(parsed) if not t.is_region]
        if text_rows:
            outputs = generate_batch(self, model, processor, [images[i] for i in text_rows],
                                     [prompts[i] for i in text_rows], [params[i] for i in text_rows],
                                     [parsed[i].name for i in text_rows],
                                     None if cancelled is None else [cancelled[i] for i in text_rows])
            for row, output in zip(text_rows, outputs, strict=True):
                results[row] = output
        for row, task in enumerate(parsed):
            if task.is_region:
                results[row] = locate(model, processor, image_list(images[row])[0], task, prompt_text(prompts[row]))
        return [r for r in results if r is not None]

    # -- stepping ----------------------------------------------------------------------------------------
    def prefill(self, model: Moondream2Model, inputs: dict[str, torch.Tensor], position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        _, logits = model.prefill(**inputs, position_ids=position_ids, cache=cache)
        return logits

    def decode(self, model: Moondream2Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        _, logits = model.step(model.text.embed_tokens(input_ids), attention_mask, position_ids, cache)
        if model.suppressed_decode_ids:
            logits[:, list(model.suppressed_decode_ids)] = float("-inf")
        return logits

    def stop_token_ids(self, model: Any, processor: Moondream2Processor) -> set[int]:
        return {processor.tokens.eos_id}

    def detokenize(self, processor: Moondream2Processor, token_ids: list[int]) -> str:
        return processor.tokenizer.decode(token_ids)


def write_random_checkpoint(path: Path, *, full_size: bool = False, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> None:
    """Random weights in the official layout: ``model.safetensors`` with ``model.*`` names, a ``config.json``
    whose ``config`` section holds the sizes, and a tiny starmie-style ``tokenizer.json``. ``full_size`` takes
    the real model's sizes (the config defaults) for benchmarks; the tokenizer's ids lie inside its vocabulary."""
    from triton_vlm.tiny import seeded

    train_tiny_tokenizer(path / "tokenizer.json")
    tokenizer = Moondream2Tokenizer.from_file(path / "tokenizer.json", eos_id=0)
    templates = starmie_template_ids(tokenizer)
    config = (MoondreamConfig(tokenizer=templates) if full_size
              else tiny_config(vocab_size=len(tokenizer), tokenizer=templates))
    seeded()
    with torch.device(device):
        model = Moondream2Model(config)
        model.init_random_weights()
    write_checkpoint(model, path, dtype=dtype)
    (path / "config.json").write_text(json.dumps(
        {"architectures": list(Moondream2Family.architectures), "model_type": "moondream1",
         "config": config.to_dict()}, indent=2))
