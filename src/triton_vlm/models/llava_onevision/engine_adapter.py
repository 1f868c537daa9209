"""LLaVA-OneVision on triton-vlm's engine: LLaVA-NeXT's anyres path
(:class:`~triton_vlm.models.llava_common.engine_adapter.AnyresEngineAdapter`: tiles of the tower's ``image_size``
through the graphed SigLIP tower, packed per image by the model's own ``pack_image_features``), with what
OneVision's model does differently as data: a request of several images gives each its whole view as one tile
(and a newline), and packing shrinks a grid past ``vision_aspect_ratio`` (``anyres_max_9``: 9 tiles' worth of
features) by bilinear interpolation. SigLIP has no CLS (the "full" strategy keeps every patch). The engine's generic
:class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` runs Qwen2, q/k/v biases read from the model."""

from __future__ import annotations

from typing import Any, ClassVar

from triton_vlm.models.llava_common.engine_adapter import AnyresEngineAdapter


class LlavaOnevisionEngineAdapter(AnyresEngineAdapter):
    several_images_whole: ClassVar[bool] = True

    def pack_settings(self, config: Any) -> dict[str, Any]:
        return {"vision_aspect_ratio": config.vision_aspect_ratio}
