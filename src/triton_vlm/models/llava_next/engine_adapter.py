"""LLaVA-NeXT on triton-vlm's engine. Its anyres images reach the vision tower as tiles of one shape (the base
image and the grid's tiles, 336 px for llava-v1.6), so the tower is graphed per batch of tiles like llava's; the
number of prompt positions an image takes depends on its size (tiles + base + a newline per row), so features
are packed per image by the model's own ``pack_image_features`` (unpadding and image newlines) and scattered
into the ``<image>`` rows the processor expanded (several images a request: each packed in prompt order). The engine's generic Llama decoder runs the Mistral or Vicuna
language model, Mistral's sliding window included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_pixels
from triton_vlm.models.llava_common.engine_adapter import ImageTokenEngineAdapter


class LlavaNextEngineAdapter(ImageTokenEngineAdapter):
    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles [tiles, 3, size, size] through CLIP (the configured layer(s), CLS dropped under the "default"
        strategy) and the projector: [tiles, patches, hidden], as ``get_image_features`` makes them before it
        packs them per image."""
        config = model.config
        hidden_states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layer = config.vision_feature_layer
        selected = (hidden_states[layer] if isinstance(layer, int)
                    else torch.cat([hidden_states[index] for index in layer], dim=-1))
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return model.model.multi_modal_projector(selected)

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every image's tiles (of every request, in prompt order) through ``encode`` in one batch, then each image
        packed (unpadded to its aspect ratio, a newline row after each row of features, the base image first):
        [image rows, hidden]. A request's ``pixel_values`` hold [images, tiles, 3, size, size], padded to its
        largest image's tile count; as transformers' ``get_image_features``, each image keeps the tiles its size
        gives."""
        config = model.config
        sizes = torch.cat([r.mm_inputs["image_sizes"] for r in requests])  # on the host: unpadding reads them
        counts = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=config.vision_config.image_size) for size in sizes]
        tiles = [pixels[:count] for pixels, count in
                 zip((p for r in requests for p in r.mm_inputs["pixel_values"]), counts, strict=True)]
        features = encode(device_pixels(tiles, model.device, model.dtype))
        packed, _ = model.model.pack_image_features(
            list(features.split(counts)), sizes,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=model.model.image_newline)
        return torch.cat(packed)
