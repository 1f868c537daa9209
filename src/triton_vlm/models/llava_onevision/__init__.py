"""LLaVA-OneVision: :mod:`.family` (the adapter the runtime uses: prompt, loading, tiny and full-size random
checkpoints) and :mod:`.engine_adapter` (how :mod:`triton_vlm.engine` runs it: anyres tiles through the graphed
SigLIP tower, packed with unpadding, the ``anyres_max`` shrink and image newlines into the prompt, the engine's
generic decoder over Qwen2 with its q/k/v biases)."""

from triton_vlm.models.llava_onevision.family import CHAT_TEMPLATE, LlavaOnevisionFamily

__all__ = ["CHAT_TEMPLATE", "LlavaOnevisionFamily"]
