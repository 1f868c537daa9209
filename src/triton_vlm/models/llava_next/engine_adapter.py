"""LLaVA-NeXT on triton-vlm's engine: anyres tiles (the base image and the grid's tiles, 336 px for llava-v1.6)
through the graphed CLIP tower, packed per image with unpadding and image newlines by the model's own
``pack_image_features`` (:class:`~triton_vlm.models.llava_common.engine_adapter.AnyresEngineAdapter`, shared with
LLaVA-OneVision). The engine's generic Llama decoder runs the Mistral or Vicuna language model, Mistral's sliding
window included."""

from __future__ import annotations

from triton_vlm.models.llava_common.engine_adapter import AnyresEngineAdapter


class LlavaNextEngineAdapter(AnyresEngineAdapter):
    """Every image of a request tiled on its best grid; packing drops CLIP's CLS under the "default" strategy."""
