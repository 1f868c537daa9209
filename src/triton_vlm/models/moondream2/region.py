"""The region heads: read coordinates and box sizes off hidden states, and write them back as embeddings.

Coordinates are classified into ``coord_out_dim`` bins over [0, 1). Sizes are classified into
``size_out_dim / 2`` bins per dimension on a log2 scale from 2**-10 to 1. Values go back into the text model
through random Fourier features (fixed frequencies learned with the checkpoint) and a linear layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triton_vlm.models.moondream2.config import RegionConfig
from triton_vlm.models.moondream2.layers import GeluMLP

#: Sizes span 2**-SIZE_LOG2_RANGE .. 1 of the image side.
SIZE_LOG2_RANGE = 10.0


def fourier_features(values: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` values x ``[k, m]`` frequencies -> ``[..., 2m]`` (cosines then sines)."""
    phase = 2 * math.pi * (values @ frequencies)
    return torch.cat([phase.cos(), phase.sin()], dim=-1)


class RegionHead(nn.Module):
    def __init__(self, config: RegionConfig) -> None:
        super().__init__()
        self.coord_features = nn.Parameter(torch.empty(1, config.coord_feat_dim // 2))
        self.coord_encoder = nn.Linear(config.coord_feat_dim, config.dim)
        self.coord_decoder = GeluMLP(config.dim, config.inner_dim, config.coord_out_dim)
        self.size_features = nn.Parameter(torch.empty(2, config.size_feat_dim // 2))
        self.size_encoder = nn.Linear(config.size_feat_dim, config.dim)
        self.size_decoder = GeluMLP(config.dim, config.inner_dim, config.size_out_dim)

    def decode_coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., 1]`` float32: the most likely bin's lower edge, in [0, 1)."""
        logits = self.coord_decoder(hidden)
        return logits.argmax(dim=-1, keepdim=True).float() / logits.shape[-1]

    def encode_coordinate(self, coordinate: torch.Tensor) -> torch.Tensor:
        """``[..., 1]`` -> ``[..., dim]``; the value is first rounded to the model's dtype, as in the reference."""
        return self.coord_encoder(fourier_features(coordinate.to(self.coord_features.dtype), self.coord_features))

    def decode_size(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., 2]`` float32 (width, height) as fractions of the image side, in (0, 1]."""
        logits = self.size_decoder(hidden)
        logits = logits.reshape(*logits.shape[:-1], 2, logits.shape[-1] // 2)
        bins = logits.argmax(dim=-1).float()
        exponent = bins / (logits.shape[-1] - 1) * SIZE_LOG2_RANGE - SIZE_LOG2_RANGE
        return torch.pow(2.0, exponent)

    def encode_size(self, size: torch.Tensor) -> torch.Tensor:
        """``[..., 2]`` (width, height) -> ``[..., dim]``."""
        return self.size_encoder(fourier_features(size.to(self.size_features.dtype), self.size_features))
