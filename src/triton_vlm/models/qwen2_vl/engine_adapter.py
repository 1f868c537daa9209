"""Qwen2-VL / Qwen2.5-VL on triton-vlm's engine: the model's vision tower over each image's patches (images vary
in size, so no graphs), its merged features in place of the ``<|image_pad|>`` tokens, and the engine's generic
:class:`~triton_vlm.engine.decoders.llama.LlamaDecoder`, which reads the q/k/v biases and the multimodal RoPE from
the model. The prompt's 3-D positions come from the model's own ``get_rope_index``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from triton_vlm.engine.adapter import EngineAdapter
from triton_vlm.engine.decoders.llama import LlamaDecoder
from triton_vlm.engine.request import EngineRequest
from triton_vlm.engine.transfer import device_copy, device_pixels
from triton_vlm.models.base import multimodal_rope


class Qwen2VLEngineAdapter(EngineAdapter):
    reuses_images = True
    per_token_inputs = ("mm_token_type_ids",)

    def prepare(self, family: Any, processor: Any, images: list[Any], text: Any) -> tuple[list[int], dict[str, Any]]:
        """Token ids with each image's ``<|image_pad|>`` run expanded; ``pixel_values`` (every image's patches, in
        prompt order) and ``image_grid_thw`` ([images, 3]) where there are images. The processor's other outputs
        (``mm_token_type_ids`` in recent transformers) go to ``get_rope_index``, a text-only request's too."""
        encoded = family.encode(processor, [images], [text])
        ids = encoded["input_ids"][0].tolist()
        extra = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        if not images:
            return ids, {**extra, "image_rows": []}
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return ids, {"pixel_values": encoded["pixel_values"], **extra,
                     "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def token_inputs(self, ids: list[int], rows: list[int]) -> dict[str, Any]:
        """``mm_token_type_ids`` as the processor makes them: 1 on the image's rows, 0 elsewhere (no video here)."""
        types = torch.zeros((1, len(ids)), dtype=torch.int64)
        types[0, rows] = 1
        return {"mm_token_type_ids": types}

    def rope_positions(self, model: Any, prompt_ids: list[int],
                       mm_inputs: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        rope = multimodal_rope(model, {**mm_inputs, "input_ids": torch.tensor([prompt_ids])})
        if rope is None:
            raise TypeError(f"{type(model).__name__} has no get_rope_index: not a Qwen2-VL model")
        positions, deltas = rope
        return positions[:, 0], int(deltas.flatten()[0])

    def build_decoder(self, model: Any) -> LlamaDecoder:
        return LlamaDecoder(model.model.language_model, model.lm_head)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Qwen2-VL's vision tower needs each image's patch grid: see image_features")

    def image_features(self, model: Any, requests: list[EngineRequest],
                       encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every request's patches through the vision tower and merger in one call (it attends within each image,
        by the grids): [image tokens of all requests, hidden]."""
        pixels = device_pixels([r.mm_inputs["pixel_values"] for r in requests], model.device, model.dtype)
        grids = device_copy(torch.cat([r.mm_inputs["image_grid_thw"] for r in requests]), model.device)
        features = model.get_image_features(pixel_values=pixels, image_grid_thw=grids)
        features = getattr(features, "pooler_output", features)  # a model output in transformers >= 5.2x
        return features if isinstance(features, torch.Tensor) else torch.cat(list(features))

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
