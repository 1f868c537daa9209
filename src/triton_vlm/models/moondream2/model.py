"""``Moondream2Model``: vision encoder + projector + text decoder + region heads, as one ``nn.Module``.

The text sequence of a request is ``[BOS, image tokens (grid * grid), prompt tokens...]``. BOS and the image
tokens form a prefix that attends bidirectionally; everything after it is causal. Batches are left-padded and
carry explicit position ids, so a padded row computes exactly what it would compute alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from triton_vlm.models.moondream2.config import MoondreamConfig
from triton_vlm.models.moondream2.region import RegionHead
from triton_vlm.models.moondream2.text import TextDecoder
from triton_vlm.models.moondream2.vision import VisionEncoder, VisionProjector


def prefill_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]``: query ``i`` may see real key ``j`` iff ``pos[j] <= max(pos[i], prefix_len - 1)``.

    That is causal attention, except that every prefix position sees the whole prefix. Padding queries see
    the prefix too, which keeps their softmax finite; their outputs are never used.
    """
    horizon = position_ids.clamp(min=prefix_len - 1)
    visible = position_ids[:, None, :] <= horizon[:, :, None]
    return (visible & attention_mask.bool()[:, None, :])[:, None]


def step_mask(attention_mask: torch.Tensor, queries: int = 1) -> torch.Tensor:
    """Boolean ``[B, 1, queries, keys]`` for decode steps: every earlier real token is visible."""
    return attention_mask.bool()[:, None, None, :].expand(-1, 1, queries, -1)


class Moondream2Model(nn.Module):
    def __init__(self, config: MoondreamConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.projector = VisionProjector(config.vision)
        self.text = TextDecoder(config.text)
        self.region = RegionHead(config.region)
        #: Token ids the answer decode never emits after its first token (set by the loader from the prompt
        #: generation: the 2025-06-21 reference masks its answer marker there).
        self.suppressed_decode_ids: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.text.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.lm_head.weight.dtype

    @property
    def image_tokens(self) -> int:
        return self.config.vision.num_patches

    @property
    def prefix_length(self) -> int:
        """BOS + image tokens: the bidirectional part of every sequence."""
        return 1 + self.image_tokens

    def encode_images(self, pixel_values: torch.Tensor, crop_counts: torch.Tensor,
                      tilings: torch.Tensor) -> torch.Tensor:
        """Crops of a whole batch, concatenated ``[sum(crop_counts), 3, S, S]`` -> ``[B, grid * grid, dim]``."""
        return self.project_images(self.vision(pixel_values.to(self.dtype)), crop_counts, tilings)

    def project_images(self, features: torch.Tensor, crop_counts: torch.Tensor,
                       tilings: torch.Tensor) -> torch.Tensor:
        """The crops' ViT features ``[sum(crop_counts), grid * grid, enc_dim]`` -> ``[B, grid * grid, dim]``."""
        images, start = [], 0
        for count, (rows, cols) in zip(crop_counts.tolist(), tilings.tolist(), strict=True):
            images.append(self.projector(features[start: start + count], (rows, cols)))
            start += count
        return torch.stack(images)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                pixel_values: torch.Tensor, crop_counts: torch.Tensor, tilings: torch.Tensor,
                position_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole left-padded prompt (image tokens at ``image_mask``) in one pass.

        Returns the last position's pre-norm hidden state ``[B, 1, dim]`` and logits ``[B, vocab]``.
        """
        embeds = self.text.embed_tokens(input_ids)
        image_embeds = self.encode_images(pixel_values, crop_counts, tilings)
        embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        mask = prefill_mask(attention_mask, position_ids, self.prefix_length)
        hidden = self.text(embeds, position_ids, mask, cache)[:, -1:]
        return hidden, self.text.logits(hidden)[:, -1]

    def step(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for ``embeds`` ``[B, 1, dim]`` (a token's or a region value's embedding).

        ``attention_mask`` ``[B, keys]`` covers the cache plus this step. Returns the pre-norm hidden state
        ``[B, 1, dim]`` and logits ``[B, vocab]``.
        """
        hidden = self.text(embeds.to(self.dtype), position_ids, step_mask(attention_mask), cache)
        return hidden, self.text.logits(hidden)[:, -1]

    @torch.no_grad()
    def init_random_weights(self, std: float = 0.02) -> None:
        """Random weights for tiny test checkpoints (the parameters created empty get a normal draw)."""
        for name, param in self.named_parameters():
            if name.endswith("position_embedding"):
                param.normal_(0.0, std)
            elif name.endswith("_features"):  # Fourier frequencies: unit scale, as coordinates span [0, 1]
                param.normal_(0.0, 1.0)
