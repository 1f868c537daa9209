"""The engine adapter base the LLaVA-style families share (kept apart from :mod:`triton_vlm.models.llava_common` so
that reading a family's prompt format or architectures imports no engine)."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.engine.adapter import Decoder, EngineAdapter, vision_tower_shape


class ImageTokenEngineAdapter(EngineAdapter):
    """The engine over a transformers LLaVA-style model: the processor expands ``<image>``, the features go to
    those rows, and the engine's :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` runs the language model
    (Llama or Mistral: its sliding window is read from the config)."""

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


def pooled(features: Any) -> Any:
    """``get_image_features``' result as a tensor or list of tensors: transformers >= 5.2x returns a model output
    that holds them as ``pooler_output``."""
    if isinstance(features, (torch.Tensor, list, tuple)):
        return features
    return features.pooler_output
