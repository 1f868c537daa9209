"""Llava on triton-vlm's engine: CLIP features scattered into the Llama prompt embeddings, Llama decoding."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.engine.adapter import EngineAdapter
from triton_vlm.engine.llama import LlamaDecoder
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_longs, device_pixels


class LlavaEngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, image: Any, prompt: str) -> tuple[list[int], dict[str, Any]]:
        encoded = processor(images=[image], text=[family.render_prompt(processor, prompt)], return_tensors="pt")
        return encoded["input_ids"][0].tolist(), {"pixel_values": encoded["pixel_values"]}

    def build_decoder(self, model: Any) -> LlamaDecoder:
        return LlamaDecoder(model.model.language_model, model.lm_head)

    def prompt_embeds(self, model: Any, decoder: LlamaDecoder, requests: list[EngineRequest]) -> list[torch.Tensor]:
        # Nothing here waits for the device (no pageable copies, no boolean-mask indexing): the decode step
        # already queued keeps the GPU busy while this is launched.
        config = model.config
        pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
        features = model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        if not isinstance(features, (torch.Tensor, list, tuple)):
            features = features.pooler_output  # transformers >= 5.2x returns a model output
        embeds = []
        for request, feature in zip(requests, features):
            embed = decoder.embed_tokens(device_longs(request.prompt_ids, model.device))
            image_positions = [i for i, token in enumerate(request.prompt_ids) if token == config.image_token_id]
            embed[device_longs(image_positions, model.device)] = feature.reshape(-1, embed.shape[-1]).to(embed.dtype)
            embeds.append(embed)
        return embeds

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
