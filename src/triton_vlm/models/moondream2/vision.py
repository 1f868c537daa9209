"""The moondream2 vision side: a pre-norm ViT over crops, and the projector that merges global and local views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_vlm.models.moondream2.config import VisionConfig
from triton_vlm.models.moondream2.image import stitch_tiles
from triton_vlm.models.moondream2.layers import GeluMLP, merge_heads, split_heads


class VisionAttention(nn.Module):
    """Full (unmasked) multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.enc_dim)
        self.attn = VisionAttention(config.enc_dim, config.enc_n_heads)
        self.norm2 = nn.LayerNorm(config.enc_dim)
        self.mlp = GeluMLP(config.enc_dim, config.enc_ff_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Crops ``[N, 3, S, S]`` (normalized to [-1, 1]) -> patch features ``[N, grid * grid, enc_dim]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.enc_dim)
        self.position_embedding = nn.Parameter(torch.empty(1, config.num_patches, config.enc_dim))
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.enc_n_layers))
        self.post_norm = nn.LayerNorm(config.enc_dim)

    def patchify(self, crops: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` -> ``[N, grid * grid, C * P * P]``; patches row-major, each flattened as (C, P, P)."""
        n, channels, size, _ = crops.shape
        patch, grid = self.config.enc_patch_size, size // self.config.enc_patch_size
        x = crops.reshape(n, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, grid * grid, channels * patch * patch)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(crops)) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class VisionProjector(nn.Module):
    """Global crop features + pooled local features -> image tokens in the text model's width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = GeluMLP(2 * config.enc_dim, config.proj_inner_dim, config.proj_out_dim)

    def forward(self, features: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """``features``: ``[1 + rows * cols, grid * grid, enc_dim]`` of one image (global crop first).

        Returns ``[grid * grid, proj_out_dim]``.
        """
        grid, dim = self.config.grid, self.config.enc_dim
        tiles = features[1:].reshape(-1, grid, grid, dim)
        stitched = stitch_tiles(tiles, tiling, self.config.overlap_margin)  # [H, W, dim]
        # However many tiles, the local view is averaged back down to one crop's grid. (The reference sizes
        # this pool by enc_n_layers, which equals the grid, 27, in the released model.)
        pooled = F.adaptive_avg_pool2d(stitched.permute(2, 0, 1), (grid, grid))
        local = pooled.permute(1, 2, 0).reshape(grid * grid, dim)
        return self.mlp(torch.cat([features[0], local], dim=-1))
