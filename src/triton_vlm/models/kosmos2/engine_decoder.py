"""The forward pass of Kosmos-2's text decoder (fairseq/Magneto style) over the engine's slot KV cache.

What differs from :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder`: absolute sinusoidal positions added to the
scaled token embeddings (counted from ``pad_token_id + 1``, as fairseq does), LayerNorms with biases, biased
projections, a LayerNorm inside attention (before ``out_proj``) and another inside the MLP (after GELU). The
image's 64 latent embeddings replace their placeholder tokens before the scaling, as in
``Kosmos2TextTransformer.forward_embedding``. Attention is plain causal, so the Llama masks apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from triton_vlm.engine import kernels
from triton_vlm.engine.attention import (
    causal_chunk_masks,
    chunk_positions,
    decode_attention,
    last_rows,
    prefill_attention,
)
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.weights import fuse_weights, output_weight, relayout


@dataclass
class _Block:
    attn_norm: torch.nn.LayerNorm
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    inner_norm: torch.nn.LayerNorm
    out: torch.nn.Linear
    mlp_norm: torch.nn.LayerNorm
    fc1: torch.nn.Linear
    act: Any
    ffn_norm: torch.nn.LayerNorm
    fc2: torch.nn.Linear


class Kosmos2Decoder:
    """Prefill (packed chunks of several sequences) and decode (one token per slot) for Kosmos-2's text model
    (``Kosmos2ForConditionalGeneration.text_model``)."""

    def __init__(self, text_model: Any) -> None:
        transformer = text_model.model
        config = transformer.config
        self.transformer = transformer
        self.lm_head = text_model.lm_head
        self.embed_tokens = transformer.embed_tokens  # unscaled: see embed()
        self.embed_scale = float(transformer.embed_scale)
        self.first_position = config.pad_token_id + 1
        self.num_heads = self.num_kv_heads = config.attention_heads
        self.head_dim = config.embed_dim // config.attention_heads
        self.num_layers = len(transformer.layers)
        self.vocab_size = self.lm_head.weight.shape[0]
        self.lm_weight = output_weight(self.lm_head, self.embed_tokens)
        # Plain torch ops but for decode attention, whose kernel reads each row's length on the device.
        self.fused = kernels.fused_available(self.lm_head.weight.device)
        self.blocks = []
        for layer in transformer.layers:
            attn = layer.self_attn
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.blocks.append(_Block(
                attn_norm=layer.self_attn_layer_norm,
                qkv=relayout(projections, fuse_weights(*projections)),
                qkv_bias=torch.cat([p.bias.data for p in projections]),
                inner_norm=attn.inner_attn_ln, out=attn.out_proj, mlp_norm=layer.final_layer_norm,
                fc1=layer.ffn.fc1, act=layer.ffn.activation_fn, ffn_norm=layer.ffn.ffn_layernorm, fc2=layer.ffn.fc2))

    def embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decoder input from unscaled token (or image) embeddings at 0-based ``positions``."""
        table = self.transformer.embed_positions.weights
        return token_embeds * self.embed_scale + table[positions + self.first_position].to(token_embeds.dtype)

    def _layers(self, h: torch.Tensor, attend: Any) -> torch.Tensor:
        tokens = h.shape[0]
        for index, block in enumerate(self.blocks):
            x = block.attn_norm(h)
            q, k, v = F.linear(x, block.qkv, block.qkv_bias).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
            h = h + block.out(block.inner_norm(attend(index, q, k, v)))
            x = block.ffn_norm(block.act(block.fc1(block.mlp_norm(h))))
            h = h + block.fc2(x)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transformer.layer_norm(hidden), self.lm_weight)

    def prefill(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache) -> torch.Tensor:
        """Packed prompt chunks (``(slot, start, length)``; ``embeds`` [tokens, dim] unscaled, image rows in
        place). Returns each chunk's last hidden state [chunks, dim]."""
        device = embeds.device
        positions = chunk_positions(chunks, device)
        attend = prefill_attention(cache, chunks, causal_chunk_masks(chunks, device), gqa=False, fused=self.fused,
                                   causal=True)
        return last_rows(self._layers(self.embed(embeds, positions), attend), chunks)

    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None) -> torch.Tensor:
        """One token for each of the first ``batch`` slots; as :meth:`LlamaDecoder.decode`."""
        h = self.embed(self.embed_tokens(tokens), lengths - 1)
        attend = decode_attention(cache, write_positions, lengths, context, self.fused)
        return self.logits(self._layers(h, attend))
