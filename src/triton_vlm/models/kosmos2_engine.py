"""Kosmos-2 on triton-vlm's engine: the image's 64 latent embeddings in place of their placeholder tokens."""

from __future__ import annotations

from typing import Any

import torch

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

    def prompt_embeds(self, model: Any, decoder: Kosmos2Decoder, requests: list[EngineRequest]) -> list[torch.Tensor]:
        """[prompt_len, dim] per request (unscaled, as the decoder takes them); images encoded in one batch."""
        pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
        features = model.get_image_features(pixel_values=pixels)
        if not isinstance(features, torch.Tensor):
            features = features.pooler_output  # the projected latents (transformers 5 returns a model output)
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
