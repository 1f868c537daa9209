"""The forward pass of moondream2's text decoder (Phi-1.5 style) over the engine's slot KV cache.

Differences from :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder`, all taken from
:mod:`triton_vlm.models.moondream2.text`: each block normalizes once (LayerNorm) and adds attention and MLP
in parallel, projections carry biases, rotary embedding covers half of each head, and the ``prefix_len``
first positions (BOS + image) attend to each other both ways. So a prompt's first prefill chunk must hold
the whole prefix (the scheduler sees to it through ``EngineRequest.min_first_chunk``). Decode steps are plain
causal steps and run in CUDA graphs like Llama's; the ids the reference never emits after the first token
are masked there.
"""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.engine import kernels
from triton_vlm.engine.attention import chunk_positions, decode_attention, last_rows, prefill_attention
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.transfer import device_longs
from triton_vlm.models.moondream2.text import apply_rotary, rotary_tables


class MoondreamDecoder:
    """Prefill (packed chunks of several sequences) and decode (one token per slot) for moondream2's text."""

    def __init__(self, text: Any, prefix_len: int, suppressed_ids: tuple[int, ...] = ()) -> None:
        config = text.config
        self.text = text
        self.embed_tokens = text.embed_tokens
        self.prefix_len = prefix_len
        self.num_heads, self.num_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.num_layers = config.n_layers
        self.vocab_size = config.vocab_size
        self._gqa = self.num_kv_heads != self.num_heads
        device = text.lm_head.weight.device
        self.fused = kernels.fused_available(device)
        self._suppressed = device_longs(list(suppressed_ids), device) if suppressed_ids else None

    # -- shared pieces ------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_tables(positions[None, :], self.rotary_dim)  # [1, tokens, rotary_dim / 2]
        return cos, sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` [tokens, heads, head_dim] rotated as the reference does ([1, heads, tokens, head_dim] there);
        one fused kernel on GPU instead of ~10 small ones."""
        if self.fused:
            return kernels.partial_rope(x, cos[0], sin[0])
        return apply_rotary(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any) -> torch.Tensor:
        """All blocks; ``attend(index, q, k, v)`` stores K/V and returns attention [tokens, dim]. On GPU a block's
        two outputs are added to the residual in the same kernel as the next block's LayerNorm."""
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        tokens = h.shape[0]
        pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the last block's attention and MLP outputs
        for index, block in enumerate(self.text.layers):
            if self.fused:
                h, normed = kernels.add_layer_norm(h, pending, block.norm.weight, block.norm.bias, block.norm.eps)
            else:
                if pending is not None:
                    h = h + pending[0] + pending[1]
                normed = block.norm(h)
            q, k, v = block.attn.qkv(normed).split([q_dim, kv_dim, kv_dim], dim=-1)
            q = self._rotate(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = self._rotate(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
            v = v.view(tokens, self.num_kv_heads, self.head_dim)
            pending = (block.attn.out_proj(attend(index, q, k, v)), block.mlp(normed))
        assert pending is not None
        return h + pending[0] + pending[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.logits(hidden)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache) -> torch.Tensor:
        """Run packed prompt chunks (``(slot, start, length)``, back to back in ``embeds`` [tokens, dim]); a chunk
        from position 0 holds at least the whole prefix. Returns each chunk's last hidden state [chunks, dim]."""
        device = embeds.device
        positions = chunk_positions(chunks, device)
        cos, sin = self._rope(positions)
        masks = []
        for _, start, length in chunks:
            queries = torch.arange(start, start + length, device=device)
            # Key j is visible to query i iff j <= max(i, prefix_len - 1): causal, the prefix seen whole.
            horizon = queries.clamp(min=self.prefix_len - 1)
            masks.append(torch.arange(start + length, device=device)[None, :] <= horizon[:, None])

        attend = prefill_attention(cache, chunks, masks, self._gqa, self.fused)
        return last_rows(self._layers(embeds, cos, sin, attend), chunks)

    # -- decode -------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None) -> torch.Tensor:
        """One token for each of the first ``batch`` slots; as :meth:`LlamaDecoder.decode`."""
        cos, sin = self._rope(lengths - 1)
        attend = decode_attention(cache, write_positions, lengths, context, self.fused)
        logits = self.logits(self._layers(self.embed_tokens(tokens), cos, sin, attend))
        if self._suppressed is not None:
            logits.index_fill_(-1, self._suppressed, float("-inf"))  # a scalar fill: graph-capturable
        return logits
