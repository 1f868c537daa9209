"""Idefics3 / SmolVLM on triton-vlm's engine: every tile of every image through the SigLIP tower and pixel-shuffle
connector in one batch, scattered into the ``<image>`` rows; the engine's generic
:class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` decodes (rope theta and scaling, tied embeddings: read
from the model's own modules).

Every tile (and the global view, and an unsplit image) is exactly ``max_image_size`` pixels square with no
padding, which for SmolVLM and Idefics3 is the tower's own ``image_size``: the tower sees one shape, and the engine
replays it as CUDA graphs at up to 16 tiles a batch (:meth:`SmolVLMEngineAdapter.image_shape`; a 4x4 split is 17
with its global view and runs eagerly, as does any larger batch). The default
:meth:`~triton_vlm.engine.adapter.EngineAdapter.image_features` concatenates the requests' tiles, so each request's
rows follow in prompt order.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from triton_vlm.engine.adapter import EngineAdapter, vision_tower_shape
from triton_vlm.engine.decoders.llama import LlamaDecoder
from triton_vlm.errors import GenerationError


class SmolVLMEngineAdapter(EngineAdapter):
    def prepare(self, family: Any, processor: Any, images: list[Image.Image], text: Any) -> tuple[list[int], dict[str, Any]]:
        """Token ids with each tile's ``<image>`` run expanded; ``pixel_values`` [tiles, 3, S, S], every image's tiles
        in prompt order. A text-only request: its token ids alone."""
        encoded = family.encode(processor, [images], [text])
        ids = encoded["input_ids"][0].tolist()
        if not images:
            return ids, {"image_rows": []}
        if not bool(encoded["pixel_attention_mask"].all()):
            # Idefics3's processors resize every tile (and the unsplit image) to max_image_size square; padding
            # only appears between rows of different tile counts in one processor call, which prepare never makes.
            raise GenerationError("smolvlm engine: the processor padded an image's tiles; the engine runs whole "
                                  "tiles only (serve this checkpoint with model_family auto)")
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return ids, {"pixel_values": encoded["pixel_values"][0],
                     "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def build_decoder(self, model: Any) -> LlamaDecoder:
        return LlamaDecoder(model.model.text_model, model.lm_head)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles ``[N, 3, S, S]`` through the tower and the connector (pixel shuffle, projection), as the model's
        ``get_image_features`` runs them: ``[N, image_seq_len, hidden]``. Every tile is whole (``encode`` checks),
        so the tower's parts run here without an attention mask: the tower itself builds one and asks the host
        whether it is all true (``mask.all()``), a sync that no CUDA graph can capture (the H100 ran SmolVLM's tower
        eagerly for it). The all-true patch mask its embeddings take is made on the device for the same reason."""
        tower = model.model.vision_model
        patch = model.config.vision_config.patch_size
        patches = torch.ones((pixels.shape[0], pixels.shape[2] // patch, pixels.shape[3] // patch),
                             dtype=torch.bool, device=pixels.device)
        hidden = tower.embeddings(pixel_values=pixels, patch_attention_mask=patches)
        hidden = tower.post_layernorm(tower.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state)
        features: torch.Tensor = model.model.connector(hidden)
        return features

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)
