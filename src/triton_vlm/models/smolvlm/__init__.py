"""Idefics3 / SmolVLM: :mod:`.family` (the adapter the runtime uses: chat prompt, tiny and full-size random
checkpoints) and :mod:`.engine_adapter` (how :mod:`triton_vlm.engine` runs it: the image's sub-images through the
model's SigLIP tower and pixel-shuffle connector into the prompt, the engine's generic Llama decoder)."""

from triton_vlm.models.smolvlm.family import SmolVLMFamily

__all__ = ["SmolVLMFamily"]
