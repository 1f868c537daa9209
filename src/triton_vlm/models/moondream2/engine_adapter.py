"""moondream2 on triton-vlm's engine: the query task (the default), image features in place of the prefix slots.

Captions and the region tasks (detect, point) keep the batched loop of :mod:`triton_vlm.models.generation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from triton_vlm.engine.adapter import EngineAdapter
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_pixels
from triton_vlm.models.moondream2.engine_decoder import MoondreamDecoder
from triton_vlm.models.moondream2.image import normalize_crops, overlap_crops


class Moondream2EngineAdapter(EngineAdapter):
    def accepts(self, task: str | None) -> bool:
        return task in (None, "query")

    def prepare(self, family: Any, processor: Any, images: list[Image.Image],
                text: Any) -> tuple[list[int], dict[str, Any]]:
        """``[BOS, image slots..., query template around the prompt...]`` (``text``: the rendered token ids); the
        slots' ids are never embedded. One image, always (the family's ``min/max_images_per_request``)."""
        config = processor.config
        slots = config.vision.num_patches
        prompt_ids = [processor.tokens.bos_id, *[processor.tokenizer.pad_token_id] * slots, *text]
        (image,) = images
        crop_set = overlap_crops(image, config.vision)
        return prompt_ids, {"pixel_values": normalize_crops(crop_set.crops), "tiling": crop_set.tiling,
                            "image_rows": list(range(1, 1 + slots))}

    def build_decoder(self, model: Any) -> MoondreamDecoder:
        return MoondreamDecoder(model.text, model.prefix_length, model.suppressed_decode_ids)

    def min_first_chunk(self, model: Any) -> int:
        """BOS and the image attend to each other both ways: they are prefilled in one chunk."""
        return int(model.prefix_length)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Crops ``[N, 3, S, S]`` through the ViT: ``[N, grid * grid, enc_dim]``. One shape per crop, so the
        engine replays it as CUDA graphs; the projector, whose work depends on each image's tiling, runs after."""
        return model.vision(pixels)

    def image_shape(self, model: Any) -> tuple[int, ...]:
        vision = model.config.vision
        return (vision.in_channels, vision.crop_size, vision.crop_size)

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every request's crops through the vision encoder in one batch; each image fills its prefix slots."""
        pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
        counts = torch.tensor([len(r.mm_inputs["pixel_values"]) for r in requests])
        tilings = torch.tensor([r.mm_inputs["tiling"] for r in requests])
        return model.project_images(encode(pixels), counts, tilings)

    def context_length(self, model: Any) -> int:
        return int(model.config.text.max_context)
