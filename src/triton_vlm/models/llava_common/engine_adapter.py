"""The engine adapter bases the LLaVA-style families share (kept apart from :mod:`triton_vlm.models.llava_common` so
that reading a family's prompt format or architectures imports no engine): :class:`ImageTokenEngineAdapter`
(llava's), and :class:`AnyresEngineAdapter` over it (llava_next's and llava_onevision's anyres tiles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from triton_vlm.engine.adapter import Decoder, EngineAdapter, vision_tower_shape
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_pixels


class ImageTokenEngineAdapter(EngineAdapter):
    """The engine over a transformers LLaVA-style model: the processor expands ``<image>``, the features go to
    those rows, and the engine's :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` runs the language model
    (Llama or Mistral: its sliding window is read from the config)."""

    reuses_images = True

    def prepare(self, family: Any, processor: Any, images: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        """The processor's outputs for one request (one ``<image>`` placeholder per image in ``text``, each expanded
        to its feature rows): ``pixel_values`` and whatever else it gives for the images (``image_sizes``), and
        ``image_rows``, the expanded ``<image>`` rows. A text-only request: its token ids alone."""
        encoded = family.encode(processor, [images], [text])
        ids = encoded["input_ids"][0].tolist()
        if not images:
            return ids, {"image_rows": []}
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        inputs = {key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")}
        return ids, {**inputs, "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def build_decoder(self, model: Any) -> Decoder:
        # Here, not at the top: the families import this module, and the decoder brings in the Triton kernels.
        from triton_vlm.engine.decoders.llama import LlamaDecoder

        return LlamaDecoder(model.model.language_model, model.lm_head)

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)


class AnyresEngineAdapter(ImageTokenEngineAdapter):
    """LLaVA-NeXT's anyres images (llava_next, llava_onevision): each image is its base view and the tiles of the
    ``image_grid_pinpoints`` grid that fits it best, all of one shape (the tower's ``image_size``), so the tower is
    graphed per batch of tiles like llava's. The number of positions an image takes depends on its size, so each
    image's features are packed by the model's own ``pack_image_features`` (unpadding to its aspect ratio, a
    newline after each row of features; LLaVA-OneVision's also shrinks a large image's grid to
    ``anyres_max_N`` tiles) and scattered into the ``<image>`` rows the processor expanded, several images of a
    request each packed in prompt order. What differs between the families is data: :attr:`several_images_whole`
    and :meth:`pack_settings`."""

    #: Whether each image of a request with several is one tile, its whole view without the grid (LLaVA-OneVision's
    #: processor and model do so; LLaVA-NeXT tiles every image).
    several_images_whole: ClassVar[bool] = False

    def pack_settings(self, config: Any) -> dict[str, Any]:
        """What the model's ``pack_image_features`` takes beside the features, sizes and newline (LLaVA-NeXT's: the
        feature strategy, for the base view's patch count)."""
        return {"vision_feature_select_strategy": config.vision_feature_select_strategy}

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles [tiles, 3, size, size] through the tower (the configured layer(s), CLIP's CLS dropped under the
        "default" strategy) and the projector: [tiles, patches, hidden], as ``get_image_features`` makes them before
        it packs them per image."""
        config = model.config
        hidden_states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layer = config.vision_feature_layer
        selected = (hidden_states[layer] if isinstance(layer, int)
                    else torch.cat([hidden_states[index] for index in layer], dim=-1))
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        features: torch.Tensor = model.model.multi_modal_projector(selected)
        return features

    def tile_counts(self, model: Any, request: EngineRequest) -> list[int]:
        """The tiles each of ``request``'s images keeps (base view included), as ``get_image_features`` counts them
        from the image sizes (on the host: the processor's ``image_sizes``)."""
        config = model.config
        sizes = request.mm_inputs["image_sizes"]
        if self.several_images_whole and len(sizes) > 1:
            return [1] * len(sizes)
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size) for size in sizes]

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every image's tiles (of every request, in prompt order) through ``encode`` in one batch, then each image
        packed: [image rows, hidden]. A request's ``pixel_values`` hold [images, tiles, 3, size, size], padded to its
        largest image's tile count; each image keeps the tiles :meth:`tile_counts` gives it."""
        counts = [count for r in requests for count in self.tile_counts(model, r)]
        tiles = [pixels[:count] for pixels, count in
                 zip((p for r in requests for p in r.mm_inputs["pixel_values"]), counts, strict=True)]
        features = encode(device_pixels(tiles, model.device, model.dtype))
        sizes = torch.cat([r.mm_inputs["image_sizes"] for r in requests])  # on the host: unpadding reads them
        packed, _ = model.model.pack_image_features(list(features.split(counts)), sizes,
                                                    image_newline=model.model.image_newline,
                                                    **self.pack_settings(model.config))
        return torch.cat(packed)


def pooled(features: Any) -> Any:
    """``get_image_features``' result as a tensor or list of tensors: transformers >= 5.2x returns a model output
    that holds them as ``pooler_output``."""
    if isinstance(features, (torch.Tensor, list, tuple)):
        return features
    return features.pooler_output
