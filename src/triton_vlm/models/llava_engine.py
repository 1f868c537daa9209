"""Llava on triton-vlm's engine: CLIP features scattered into the Llama prompt embeddings, Llama decoding."""

from __future__ import annotations

from collections.abc import Callable
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

    def encode_images(self, model: Any, pixels: torch.Tensor, *args: Any) -> torch.Tensor:
        """CLIP features through the projector: [images, 576, hidden]."""
        config = model.config
        features = model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        if not isinstance(features, (torch.Tensor, list, tuple)):
            features = features.pooler_output  # transformers >= 5.2x returns a model output
        return features if isinstance(features, torch.Tensor) else torch.stack(list(features))

    def image_shape(self, model: Any) -> tuple[int, ...]:
        size = model.config.vision_config.image_size
        return (model.config.vision_config.num_channels, size, size)

    def prompt_embeds(self, model: Any, decoder: LlamaDecoder, requests: list[EngineRequest],
                      encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        # Nothing here waits for the device (no pageable copies, no boolean-mask indexing): the decode step
        # already queued keeps the GPU busy while this is launched.
        config = model.config
        features = encode(device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype))
        # One embedding lookup and one scatter for the whole batch: per-request launches leave the device idle
        # while the host, sharing its GIL with the thread that tokenizes new requests, works through them.
        lengths = [len(r.prompt_ids) for r in requests]
        ids = [token for r in requests for token in r.prompt_ids]
        embeds = decoder.embed_tokens(device_longs(ids, model.device))
        image_rows = [row for row, token in enumerate(ids) if token == config.image_token_id]
        embeds[device_longs(image_rows, model.device)] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return list(embeds.split(lengths))

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
