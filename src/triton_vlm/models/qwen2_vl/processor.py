"""Qwen2-VL's processor with or without torchvision.

transformers builds Qwen2-VL's processor with a video processor, which needs torchvision; where torchvision is
missing (the CPU dev box: PyPI's torchvision wheels are CUDA builds, which do not import beside a CPU torch) the
processor is built without it, around the image processor's PIL version. Images behave the same; videos (which
triton-vlm never sends) are unavailable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def processor_class(model_type: str) -> Any:
    """The processor class of a Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) checkpoint."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    return Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen2VLProcessor


def images_only(cls: Any, image_processor: Any, tokenizer: Any, chat_template: str | None) -> Any:
    """``cls`` (a Qwen VL processor class) built without a video processor."""
    from transformers import ProcessorMixin

    def check(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None  # transformers' video processors need torchvision; images never touch it
        return ProcessorMixin.check_argument_for_proper_class(self, argument_name, argument)

    without_video = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check})
    return without_video(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template)


def load_processor(source: str, model_type: str, **common: Any) -> Any:
    """The processor of the checkpoint at ``source`` (``common``: ``from_pretrained``'s keyword arguments)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(source, **common)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    image_processor = AutoImageProcessor.from_pretrained(source, **common)  # the PIL one without torchvision
    return images_only(processor_class(model_type), image_processor, tokenizer, tokenizer.chat_template)


def save_processor(path: Path, image_processor: Any, tokenizer: Any, model_type: str) -> None:
    """Write the processor's files as a real checkpoint has them (``preprocessor_config.json``, the tokenizer's
    files, ``chat_template.jinja``), torchvision or not: the image processor and the tokenizer save themselves."""
    image_processor.processor_class = processor_class(model_type).__name__
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
