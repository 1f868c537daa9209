"""The moondream2 text decoder (Phi-1.5 style), driven step by step through a transformers ``DynamicCache``.

Each block normalizes once and adds attention and MLP outputs in parallel. Rotary position embedding covers
the first half of every head; the rest of the head carries no position. Masks are built by the caller
(:mod:`triton_vlm.models.moondream2.masks`) because the image prefix attends bidirectionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from triton_vlm.models.moondream2.config import TextConfig
from triton_vlm.models.moondream2.layers import GeluMLP, merge_heads, split_heads

ROPE_THETA = 10000.0


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, T, rotary_dim / 2]`` in float32 for integer ``position_ids`` ``[B, T]``.

    Computed per call from the positions (a few thousand flops), so the model has no position buffer to keep
    in sync with its device or context length.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim
    angles = position_ids.to(torch.float32)[..., None] * (1.0 / ROPE_THETA ** exponents)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head of ``x`` ``[B, H, T, D]``.

    Dim ``j`` pairs with dim ``j + half``. The reference writes each rotated pair next to each other
    (interleaved) while we keep the two halves apart; queries and keys get the same layout either way, so
    every attention score is identical.
    """
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    first, second, rest = x[..., :half].float(), x[..., half: 2 * half].float(), x[..., 2 * half:]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.n_heads, config.n_kv_heads
        self.q_dim, self.kv_dim = config.dim, config.n_kv_heads * config.head_dim
        self.qkv = nn.Linear(config.dim, self.q_dim + 2 * self.kv_dim)
        self.out_proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Any) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = apply_rotary(split_heads(q, self.heads), cos, sin)
        k = apply_rotary(split_heads(k, self.kv_heads), cos, sin)
        v = split_heads(v, self.kv_heads)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class TextBlock(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.attn = TextAttention(config, layer_idx)
        self.mlp = GeluMLP(config.dim, config.ff_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Any) -> torch.Tensor:
        normed = self.norm(x)
        return x + self.attn(normed, cos, sin, mask, cache) + self.mlp(normed)


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TextBlock(config, i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                cache: Any) -> torch.Tensor:
        """Hidden states ``[B, T, dim]`` *before* the final norm: the region heads read them raw.

        ``mask`` is a boolean ``[B, 1, T, keys]`` (True: may attend); ``cache`` a ``DynamicCache`` or None.
        """
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))
