"""moondream2 on triton-vlm's engine: the query task (the default), image features in place of the prefix slots.

Captions and the region tasks (detect, point) keep the batched loop of :mod:`triton_vlm.generation`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from triton_vlm.engine.adapter import EngineAdapter
from triton_vlm.engine.moondream import MoondreamDecoder
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_longs, device_pixels
from triton_vlm.models.moondream2.image import normalize_crops, overlap_crops


class Moondream2EngineAdapter(EngineAdapter):
    def accepts(self, task: str | None) -> bool:
        return task in (None, "query")

    def prepare(self, family: Any, processor: Any, image: Image.Image, prompt: str) -> tuple[list[int], dict]:
        """``[BOS, image slots..., query template around prompt...]``; the slots' ids are never embedded."""
        config = processor.config
        slots = config.vision.num_patches
        prompt_ids = [processor.tokens.bos_id, *[processor.tokenizer.pad_token_id] * slots,
                      *family.render_prompt(processor, prompt)]
        crop_set = overlap_crops(image, config.vision)
        return prompt_ids, {"pixel_values": normalize_crops(crop_set.crops), "tiling": crop_set.tiling}

    def build_decoder(self, model: Any) -> MoondreamDecoder:
        return MoondreamDecoder(model.text, model.prefix_length, model.suppressed_decode_ids)

    def min_first_chunk(self, model: Any) -> int:
        """BOS and the image attend to each other both ways: they are prefilled in one chunk."""
        return int(model.prefix_length)

    def encode_images(self, model: Any, pixels: torch.Tensor, *args: Any) -> list[torch.Tensor]:
        """``args``: crops per image and tilings (CPU tensors); one [prefix slots, dim] tensor per image."""
        counts, tilings = args
        return model.encode_images(pixels, counts, tilings)

    def prompt_embeds(self, model: Any, decoder: MoondreamDecoder, requests: list[EngineRequest],
                      encode: Callable[..., list[torch.Tensor]]) -> list[torch.Tensor]:
        """[prompt_len, dim] per request; every request's crops go through the vision encoder in one batch."""
        pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
        counts = torch.tensor([len(r.mm_inputs["pixel_values"]) for r in requests])
        tilings = torch.tensor([r.mm_inputs["tiling"] for r in requests])
        images = encode(pixels, counts, tilings)
        lengths = [len(r.prompt_ids) for r in requests]
        embeds = decoder.embed_tokens(device_longs([t for r in requests for t in r.prompt_ids], model.device))
        starts = [0, *itertools.accumulate(lengths)][:-1]
        for start, image in zip(starts, images):  # a view per request: no per-request embedding lookups
            embeds[start + 1:start + 1 + image.shape[0]] = image.to(embeds.dtype)
        return list(embeds.split(lengths))

    def context_length(self, model: Any) -> int:
        return int(model.config.text.max_context)
