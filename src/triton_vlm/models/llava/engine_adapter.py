"""Llava on triton-vlm's engine: CLIP features scattered into the Llama prompt embeddings, decoded by the engine's
generic :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder`."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.engine.adapter import EngineAdapter, vision_tower_shape
from triton_vlm.engine.decoders.llama import LlamaDecoder


class LlavaEngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, images: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        """One ``<image>`` placeholder per image in ``text``, each expanded to its feature rows by the processor."""
        encoded = family.encode(processor, [images], [text])
        ids = encoded["input_ids"][0].tolist()
        if not images:
            return ids, {"image_rows": []}
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return ids, {"pixel_values": encoded["pixel_values"],
                     "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def build_decoder(self, model: Any) -> LlamaDecoder:
        return LlamaDecoder(model.model.language_model, model.lm_head)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP features through the projector: [images, 576, hidden]."""
        config = model.config
        features = model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        if not isinstance(features, (torch.Tensor, list, tuple)):
            features = features.pooler_output  # transformers >= 5.2x returns a model output
        return features if isinstance(features, torch.Tensor) else torch.stack(list(features))

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
