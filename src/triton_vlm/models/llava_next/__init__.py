"""LLaVA-NeXT (LLaVA-1.6): :mod:`.family` (the adapter the runtime uses: prompt, tiny checkpoint) and
:mod:`.engine_adapter` (how :mod:`triton_vlm.engine` runs it: anyres tiles through CLIP, packed with the image
newline into the prompt, the engine's generic Llama decoder with Mistral's sliding window where set)."""

from triton_vlm.models.llava_next.family import CHAT_TEMPLATE, LlavaNextFamily

__all__ = ["CHAT_TEMPLATE", "LlavaNextFamily"]
