"""LLaVA-1.5: :mod:`.family` (the adapter the runtime uses: prompt, tiny checkpoint) and :mod:`.engine_adapter`
(how :mod:`triton_vlm.engine` runs it: CLIP features into the prompt, the engine's generic Llama decoder)."""

from triton_vlm.models.llava.family import CHAT_TEMPLATE, LlavaFamily
from triton_vlm.models.llava_common import IMAGE_TOKEN

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "LlavaFamily"]
