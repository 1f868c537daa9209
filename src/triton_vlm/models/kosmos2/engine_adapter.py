"""Kosmos-2 on triton-vlm's engine: the image's 64 latent embeddings in place of their placeholder tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from triton_vlm.engine.adapter import EngineAdapter, vision_tower_shape
from triton_vlm.models.kosmos2.engine_decoder import Kosmos2Decoder


class Kosmos2EngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, images: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        encoded = family.encode(processor, [images], [text])
        if not images:  # a text-only turn: the language model alone
            return encoded["input_ids"][0].tolist(), {"image_rows": []}
        image_rows = encoded["image_embeds_position_mask"][0].nonzero().flatten().tolist()
        return encoded["input_ids"][0].tolist(), {"pixel_values": encoded["pixel_values"], "image_rows": image_rows}

    def build_decoder(self, model: Any) -> Kosmos2Decoder:
        return Kosmos2Decoder(model.text_model)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """[images, latent_query_num, dim]: what ``Kosmos2ForConditionalGeneration.forward`` puts in place of the
        image tokens (vision tower, post-LayerNorm of every position, L2 normalization, the latent-query
        projection), from its modules: ``get_image_features`` only exists in recent transformers."""
        hidden = model.vision_model(pixel_values=pixels)[0]
        hidden = F.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
        return model.image_to_text_projection(hidden)[0]

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
