"""Llava on triton-vlm's engine: CLIP features scattered into the Llama prompt embeddings, decoded by the engine's
generic :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` (:class:`ImageTokenEngineAdapter`)."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.models.llava_common.engine_adapter import ImageTokenEngineAdapter, pooled


class LlavaEngineAdapter(ImageTokenEngineAdapter):
    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP features through the projector: [images, 576, hidden]."""
        config = model.config
        features = pooled(model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy))
        return features if isinstance(features, torch.Tensor) else torch.stack(list(features))
