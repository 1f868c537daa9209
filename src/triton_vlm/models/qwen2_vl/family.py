"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``): a ViT
over dynamic-resolution images (windowed attention in 2.5), merged 2x2 into the tokens of a Qwen2 decoder with
q/k/v biases and multimodal 3-D rotary positions.

One family for both: they differ in the vision tower, which runs as the model's own module, and in their config
and processor classes (data). An image of any size becomes ``ceil(h / 28) * ceil(w / 28)`` tokens at the real
models' 14 px patches, within the processor's ``min_pixels`` / ``max_pixels``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from triton_vlm.models.base import ModelFamily, multimodal_rope
from triton_vlm.models.qwen2_vl.checkpoint import QWEN2_5_VL, QWEN2_VL, write_random_checkpoint
from triton_vlm.models.qwen2_vl.processor import load_processor


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    default_hf_model_id = "Qwen/Qwen2-VL-7B-Instruct"
    #: The Hugging Face architectures this family serves (``config.json``'s ``architectures``).
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    auto_cuda_dtype = "bfloat16"  # both are released in bfloat16
    # The tokenizer's control tokens: a user's "<|im_end|>" would end the turn, an "<|image_pad|>" ask for an image.
    reserved_prompt_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                              "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    engine_adapter_class = ("triton_vlm.models.qwen2_vl.engine_adapter", "Qwen2VLEngineAdapter")

    def model_class(self) -> type[Any]:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText  # Qwen2-VL's or Qwen2.5-VL's class, from the checkpoint's config

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        common = dict(revision=revision, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        model = self.model_class().from_pretrained(source, dtype=dtype, use_safetensors=True, **common)
        model.to(device).eval()
        processor = load_processor(source, model.config.model_type, **common)
        processor.tokenizer.padding_side = "left"
        return model, processor

    def position_ids(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own 3-D positions ([3, batch, seq]); decode steps continue from the last (text) one + 1."""
        rope = multimodal_rope(model, inputs)
        if rope is None:
            raise TypeError(f"{type(model).__name__} has no get_rope_index: not a Qwen2-VL model")
        return rope[0]

    def tiny_variant(self, hf_model_id: str) -> str | None:
        """The Qwen2.5-VL tiny checkpoint for a Qwen2.5-VL id; the family's default (Qwen2-VL) otherwise."""
        lowered = hf_model_id.lower().replace("_", ".")
        return QWEN2_5_VL if "qwen2.5-vl" in lowered else None

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        write_random_checkpoint(path, variant or QWEN2_VL)
