"""Processors whose transformers class also builds a video processor (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision), with
or without torchvision.

transformers builds these processors with a video processor, which needs torchvision; where torchvision is missing
(the CPU dev box: PyPI's torchvision wheels are CUDA builds, which do not import beside a CPU torch) the processor
is built without it, around the image processor's PIL version. Images behave the same; videos (which triton-vlm
never sends) are unavailable. Shared by the families that need it (a family imports no other family).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

#: A processor's constructor arguments that are its parts, not settings from ``processor_config.json``.
_PARTS = ("image_processor", "tokenizer", "video_processor", "chat_template")


def images_only(cls: Any, image_processor: Any, tokenizer: Any, chat_template: str | None, **settings: Any) -> Any:
    """``cls`` (a processor class with a video processor) built without one; ``settings``: its other constructor
    arguments (LLaVA-OneVision's ``num_image_tokens``, ...)."""
    from transformers import ProcessorMixin

    def check(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None  # transformers' video processors need torchvision; images never touch it
        return ProcessorMixin.check_argument_for_proper_class(self, argument_name, argument)

    without_video = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check})
    return without_video(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **settings)


def load_processor(source: str, cls: Any, **common: Any) -> Any:
    """The processor (of class ``cls``) of the checkpoint at ``source`` (``common``: ``from_pretrained``'s keyword
    arguments): transformers' own where torchvision is installed, else :func:`images_only` with the checkpoint's
    tokenizer, image processor, chat template and ``processor_config.json`` settings."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(source, **common)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    image_processor = AutoImageProcessor.from_pretrained(source, **common)  # the PIL one without torchvision
    saved, _ = cls.get_processor_dict(source, **common)  # processor_config.json and the processor's chat template
    accepted = inspect.signature(cls.__init__).parameters
    settings = {key: value for key, value in saved.items() if key in accepted and key not in _PARTS}
    return images_only(cls, image_processor, tokenizer, saved.get("chat_template") or tokenizer.chat_template,
                       **settings)


def save_processor(path: Path, cls: Any, image_processor: Any, tokenizer: Any, **settings: Any) -> None:
    """Write the processor's files as a real checkpoint has them (``preprocessor_config.json``, the tokenizer's
    files and its ``chat_template.jinja``, and ``processor_config.json`` where there are ``settings``), torchvision
    or not: the image processor and the tokenizer save themselves (a processor without its video processor
    cannot)."""
    image_processor.processor_class = cls.__name__
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if settings:
        config = {"processor_class": cls.__name__, **settings}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
