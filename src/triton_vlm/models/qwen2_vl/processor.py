"""Qwen2-VL's processor with or without torchvision (:mod:`triton_vlm.models.processors`): the class of each
model type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triton_vlm.models import processors


def processor_class(model_type: str) -> Any:
    """The processor class of a Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) checkpoint."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    return Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen2VLProcessor


def load_processor(source: str, model_type: str, **common: Any) -> Any:
    """The processor of the checkpoint at ``source`` (``common``: ``from_pretrained``'s keyword arguments)."""
    return processors.load_processor(source, processor_class(model_type), **common)


def save_processor(path: Path, image_processor: Any, tokenizer: Any, model_type: str) -> None:
    """Write the processor's files as a real checkpoint has them."""
    processors.save_processor(path, processor_class(model_type), image_processor, tokenizer)
