"""Idefics3 / SmolVLM on triton-vlm's engine: every tile of every image through the SigLIP tower and pixel-shuffle
connector in one batch, scattered into the ``<image>`` rows; the engine's generic
:class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` decodes (rope theta and scaling, tied embeddings: read
from the model's own modules).

Where the processor splits images (the shipped checkpoints do), each tile is exactly ``max_image_size`` pixels
square with no padding, which for SmolVLM is the tower's own ``image_size``: the tower then sees one shape and the
engine replays it as CUDA graphs (:meth:`SmolVLMEngineAdapter.image_shape`). A request with padded tiles (image
splitting off, or a processor whose tiles are not the tower's size) goes through the model's
``get_image_features`` with its pixel mask instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from triton_vlm.engine.adapter import EngineAdapter, vision_tower_shape
from triton_vlm.engine.decoders.llama import LlamaDecoder
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_pixels


class SmolVLMEngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, image: Image.Image, prompt: str) -> tuple[list[int], dict[str, Any]]:
        """Token ids with each tile's ``<image>`` run expanded; ``pixel_values`` [tiles, 3, H, W] in prompt order,
        and ``pixel_attention_mask`` [tiles, H, W] where some pixels are padding (else None)."""
        encoded = processor(images=[image], text=[family.render_prompt(processor, prompt)], return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        mask = encoded["pixel_attention_mask"][0].bool()
        return ids, {"pixel_values": encoded["pixel_values"][0],
                     "pixel_attention_mask": None if bool(mask.all()) else mask,
                     "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def build_decoder(self, model: Any) -> LlamaDecoder:
        return LlamaDecoder(model.model.text_model, model.lm_head)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Whole tiles ``[N, 3, S, S]`` through the tower and connector: ``[N, image_seq_len, hidden]``. The patch
        mask is made on the device (the tower's own default is a host tensor copied over, which a CUDA graph
        cannot capture)."""
        patch = model.config.vision_config.patch_size
        patches = torch.ones((pixels.shape[0], pixels.shape[2] // patch, pixels.shape[3] // patch),
                             dtype=torch.bool, device=pixels.device)
        hidden = model.model.vision_model(pixel_values=pixels, patch_attention_mask=patches).last_hidden_state
        features: torch.Tensor = model.model.connector(hidden)
        return features

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A row per ``<image>`` token of the requests, in order: every whole tile in one batch through ``encode``
        (graphed); requests with padded tiles through ``get_image_features`` with their pixel mask."""
        if all(r.mm_inputs["pixel_attention_mask"] is None for r in requests):
            pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
            return encode(pixels).reshape(-1, model.config.text_config.hidden_size)
        rows = []
        for r in requests:
            pixels = device_pixels([r.mm_inputs["pixel_values"]], model.device, model.dtype)
            mask = r.mm_inputs["pixel_attention_mask"]
            if mask is None:
                rows.append(encode(pixels).reshape(-1, model.config.text_config.hidden_size))
                continue
            out = model.get_image_features(pixel_values=pixels[None], pixel_attention_mask=mask[None].to(model.device))
            rows.extend(out.pooler_output)  # one [tokens, hidden] per prompt: here the one
        return torch.cat(rows)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
