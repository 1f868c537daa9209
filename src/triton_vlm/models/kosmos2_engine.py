"""Kosmos-2 on triton-vlm's engine: the image's 64 latent embeddings in place of their placeholder tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from triton_vlm.engine.adapter import EngineAdapter
from triton_vlm.engine.kosmos2 import Kosmos2Decoder
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_longs, device_pixels


class Kosmos2EngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, image: Any, prompt: str) -> tuple[list[int], dict[str, Any]]:
        encoded = family.encode(processor, [image], [family.render_prompt(processor, prompt)])
        image_rows = encoded["image_embeds_position_mask"][0].nonzero().flatten().tolist()
        return encoded["input_ids"][0].tolist(), {"pixel_values": encoded["pixel_values"], "image_rows": image_rows}

    def build_decoder(self, model: Any) -> Kosmos2Decoder:
        return Kosmos2Decoder(model.text_model)

    def encode_images(self, model: Any, pixels: torch.Tensor, *args: Any) -> torch.Tensor:
        """[images, latent_query_num, dim]: what ``Kosmos2ForConditionalGeneration.forward`` puts in place of the
        image tokens (vision tower, post-LayerNorm of every position, L2 normalization, the latent-query
        projection), from its modules: ``get_image_features`` only exists in recent transformers."""
        hidden = model.vision_model(pixel_values=pixels)[0]
        hidden = F.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
        return model.image_to_text_projection(hidden)[0]

    def image_shape(self, model: Any) -> tuple[int, ...]:
        size = model.config.vision_config.image_size
        return (model.config.vision_config.num_channels, size, size)

    def prompt_embeds(self, model: Any, decoder: Kosmos2Decoder, requests: list[EngineRequest],
                      encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """[prompt_len, dim] per request (unscaled, as the decoder takes them); images encoded in one batch."""
        features = encode(device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype))
        lengths = [len(r.prompt_ids) for r in requests]
        embeds = decoder.embed_tokens(device_longs([t for r in requests for t in r.prompt_ids], model.device))
        offsets = [0]
        for length in lengths[:-1]:
            offsets.append(offsets[-1] + length)
        rows = [offset + row for offset, r in zip(offsets, requests) for row in r.mm_inputs["image_rows"]]
        embeds[device_longs(rows, model.device)] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return list(embeds.split(lengths))

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
