"""The forward pass of a Hugging Face Llama-family language model over the engine's slot KV cache.

Generic: any family whose language model is a Llama (llava's, and the Llama-like ones of other VLMs) builds it
from its model's modules; what differs between such models is read from their config, not written as
subclasses. We reuse the model's own modules (embeddings, RMSNorms, rotary embedding, lm_head) and its weights,
fused for fewer, larger matmuls: q/k/v into one projection and gate/up into another
(:mod:`triton_vlm.engine.weights`). Those projections may be quantized to fp8 (:meth:`LlamaDecoder.quantize`).

Read from the model, not written as subclasses: q/k/v biases (Qwen2), fused like their weights and added after the
matmul (so fp8 projections keep them); multimodal RoPE (Qwen2-VL's ``mrope_section``: 3-D positions over
time/height/width), where the model's own rotary module turns ``[3, tokens]`` positions into cos/sin and the
runner hands over each row's position (:attr:`LlamaDecoder.multimodal_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from triton_vlm.engine import kernels
from triton_vlm.engine.attention import (
    causal_chunk_masks,
    chunk_positions,
    decode_attention,
    last_rows,
    mixed_attention,
    prefill_attention,
    sliding_window,
)
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.quantization import FP8, FP8_MAX, Fp8Rows, Fp8Weight, linear, quantize_rows, takes_fp8_rows
from triton_vlm.engine.weights import fuse_biases, fuse_weights, output_weight, relayout

#: A projection's weight: dense [out, in] in the model's dtype, or fp8.
Weight = torch.Tensor | Fp8Weight


@dataclass
class _Layer:
    input_norm: Any
    post_norm: Any
    eps: float
    qkv: Weight
    #: The q/k/v biases, fused like ``qkv`` (Qwen2); None where the projections have none (Llama).
    qkv_bias: torch.Tensor | None
    o: Weight
    gate_up: Weight
    down: Weight

    PROJECTIONS: ClassVar[tuple[str, ...]] = ("qkv", "o", "gate_up", "down")


class LlamaDecoder:
    """Prefill (packed chunks of several sequences) and decode (one token per slot) for Llama models."""

    #: Whether a step's prompt chunks and decode rows run as one forward (:meth:`prefill_and_decode`). On an H100
    #: (llava, 64 clients) that gave +1.2% at 4096 prompt tokens a step and +4.3% at 1024; with fp8 projections it
    #: lost 0.5% and 2.5% (the decode rows leave their small-batch fp8 kernels and CUDA graph), so
    #: :meth:`quantize` turns it off.
    mixes = True
    #: Whether the RMSNorm and SiLU-gating kernels hand fp8 projections their inputs already quantized
    #: (:class:`Fp8Rows`) instead of in the model's dtype for a quantizing pass of the projection's own.
    fp8_inputs_from_producers = True

    def __init__(self, language_model: Any, lm_head: torch.nn.Linear) -> None:
        config = language_model.config
        if language_model.layers[0].self_attn.o_proj.bias is not None or getattr(config, "mlp_bias", False):
            raise NotImplementedError("LlamaDecoder: biased output or MLP projections are not supported")
        self.embed_tokens = language_model.embed_tokens
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        #: Multimodal RoPE (Qwen2-VL): rows are rotated by positions the runner passes (a prompt's own 3-D ones; a
        #: decode row's length - 1 + its request's offset), not by their cache positions.
        self.multimodal_positions = "mrope_section" in (getattr(config, "rope_parameters", None) or {})
        #: Decode rows may name their slots (:class:`~triton_vlm.engine.adapter.RowsDecoder`).
        self.slotted_rows = True
        self.lm_head = lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.vocab_size = lm_head.weight.shape[0]
        self.lm_weight = output_weight(lm_head, self.embed_tokens)
        self._hf_layers = language_model.layers
        self.layers = []
        for layer in language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                eps=layer.input_layernorm.variance_epsilon,
                qkv=relayout((attn.q_proj, attn.k_proj, attn.v_proj),
                             fuse_weights(attn.q_proj, attn.k_proj, attn.v_proj)),
                qkv_bias=fuse_biases(attn.q_proj, attn.k_proj, attn.v_proj),
                o=relayout((attn.o_proj,), attn.o_proj.weight.data),
                gate_up=relayout((mlp.gate_proj, mlp.up_proj), fuse_weights(mlp.gate_proj, mlp.up_proj)),
                down=relayout((mlp.down_proj,), mlp.down_proj.weight.data),
            ))
        self._gqa = self.num_kv_heads != self.num_heads
        #: Mistral's sliding window (None: every position sees the whole prefix).
        self.window = sliding_window(config)
        self.fused = kernels.fused_available(lm_head.weight.device)

    def quantize(self, method: str) -> None:
        """Quantize every layer's projections (``method`` "fp8"; embeddings, norms and lm_head stay as they are).
        The dense weights are freed: the Hugging Face language model they belonged to can no longer run."""
        if method != "fp8":
            raise ValueError(f"LlamaDecoder: unknown quantization {method!r}")
        self.mixes = False
        for layer, hf_layer in zip(self.layers, self._hf_layers, strict=True):
            for name in _Layer.PROJECTIONS:
                weight = getattr(layer, name)
                if isinstance(weight, torch.Tensor):
                    setattr(layer, name, Fp8Weight.quantize(weight))
            for module in (*hf_layer.self_attn.children(), *hf_layer.mlp.children()):
                if isinstance(module, torch.nn.Linear):
                    module.weight.data = module.weight.data.new_empty(0)

    # -- shared pieces ------------------------------------------------------------------------------------
    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [tokens, 1, head_dim] for ``positions`` ([tokens], or [3, tokens] for multimodal RoPE, where
        [tokens] means three equal rows); computed once per forward, shared by all layers."""
        if self.multimodal_positions and positions.dim() == 1:
            # Spelled out: transformers 5.25's Qwen2-VL rotary expands [1, tokens] itself, 5.17's indexes 3-D.
            positions = positions.expand(3, -1)
        cos, sin = self.rotary(h, positions[..., None, :])
        return cos[0][:, None, :], sin[0][:, None, :]

    def _fp8_for(self, weight: Weight, rows: int) -> bool:
        """Whether the input of ``weight`` is made as :class:`Fp8Rows`."""
        return self.fp8_inputs_from_producers and takes_fp8_rows(weight, rows)

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: Any, eps: float,
              fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
        """(new residual, normalized): ``residual + x`` then RMSNorm, fused on GPU; the normalized rows as
        :class:`Fp8Rows` with ``fp8``."""
        if self.fused:
            summed = x if residual is None else residual  # the kernel adds x into residual in place
            if fp8:
                return summed, Fp8Rows(*kernels.add_rms_norm_fp8(x, residual, norm.weight, eps, FP8, FP8_MAX))
            return summed, kernels.add_rms_norm(x, residual, norm.weight, eps)
        summed = x if residual is None else residual + x
        normed = kernels.rms_norm_torch(summed, norm.weight, eps)
        return summed, Fp8Rows(*quantize_rows(normed)) if fp8 else normed

    def _gate(self, gate_up: torch.Tensor, fp8: bool) -> torch.Tensor | Fp8Rows:
        """SiLU(gate) * up, fused on GPU; as :class:`Fp8Rows` with ``fp8``."""
        if self.fused:
            return Fp8Rows(*kernels.silu_mul_fp8(gate_up, FP8, FP8_MAX)) if fp8 else kernels.silu_mul(gate_up)
        gated = kernels.silu_mul_torch(gate_up)
        return Fp8Rows(*quantize_rows(gated)) if fp8 else gated

    def _qkv(self, x: torch.Tensor | Fp8Rows, layer: _Layer, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` is the normalized layer input; returns rotated q, k and v per head."""
        qkv = linear(x, layer.qkv)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        tokens = qkv.shape[0]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        rotate = kernels.rope if self.fused else kernels.rope_torch
        return rotate(q, cos, sin), rotate(k, cos, sin), v.view(tokens, self.num_kv_heads, self.head_dim)

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any) -> torch.Tensor:
        """All decoder layers; ``attend(index, q, k, v)`` stores K/V and returns attention [tokens, hidden]."""
        residual: torch.Tensor | None = None
        x = h
        rows = h.shape[0]
        for index, layer in enumerate(self.layers):
            residual, normed = self._norm(x, residual, layer.input_norm, layer.eps, self._fp8_for(layer.qkv, rows))
            q, k, v = self._qkv(normed, layer, cos, sin)
            attn = linear(attend(index, q, k, v), layer.o)
            residual, normed = self._norm(attn, residual, layer.post_norm, layer.eps,
                                          self._fp8_for(layer.gate_up, rows))
            gate_up = linear(normed, layer.gate_up)
            x = linear(self._gate(gate_up, self._fp8_for(layer.down, rows)), layer.down)
        assert residual is not None
        return residual + x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.lm_weight)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run packed prompt chunks. ``embeds`` [tokens, hidden] holds the chunks back to back;
        ``chunks`` are ``(slot, start, length)``; ``positions`` their rotary positions ([tokens] or [3, tokens];
        default: their places in the prompt). Returns each chunk's last hidden state [chunks, hidden]."""
        if positions is None:
            positions = chunk_positions(chunks, embeds.device)
        cos, sin = self._rope(embeds, positions)
        attend = prefill_attention(cache, chunks, causal_chunk_masks(chunks, embeds.device, self.window), self._gqa,
                                   self.fused, causal=True, window=self.window)
        return last_rows(self._layers(embeds, cos, sin, attend), chunks)

    # -- decode -------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
               cache: SlotKVCache, context: int | None = None, positions: torch.Tensor | None = None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each of the first ``batch`` slots (row i is slot i, or ``slots[i]``).

        Per row: ``tokens`` the input token, ``write_positions`` where its K/V goes (the scratch column for idle
        rows) and ``lengths`` how many positions it attends to; ``positions`` its rotary position (default
        ``lengths - 1``). ``context`` bounds every length; the fused attention needs none (it reads the lengths on
        the device). Returns logits [batch, vocab]."""
        h = self.embed_tokens(tokens)
        cos, sin = self._rope(h, lengths - 1 if positions is None else positions)
        h = self._layers(h, cos, sin, decode_attention(cache, write_positions, lengths, context, self.fused,
                                                       self.window, slots))
        return self.logits(h)

    # -- both in one forward ------------------------------------------------------------------------------
    def prefill_and_decode(self, embeds: torch.Tensor, chunks: list[tuple[int, int, int]], cache: SlotKVCache,
                           tokens: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor,
                           context: int | None = None, prompt_positions: torch.Tensor | None = None,
                           decode_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prefill` and :meth:`decode` (same arguments) as one forward. Each projection multiplies the
        prompt rows and the decode rows together, so a step that carries prompt chunks reads the weights once
        instead of twice: a decode step alone is bound by those reads, a prefill by its FLOPs, which a few
        dozen decode rows barely add to. Returns (logits after each chunk [chunks, vocab], decode logits
        [batch, vocab])."""
        count = embeds.shape[0]
        h = torch.cat([embeds, self.embed_tokens(tokens)])
        prompt = chunk_positions(chunks, h.device) if prompt_positions is None else prompt_positions
        rows = lengths - 1 if decode_positions is None else decode_positions
        cos, sin = self._rope(h, torch.cat([prompt, rows.expand(*prompt.shape[:-1], -1)], dim=-1))
        attend = mixed_attention(
            prefill_attention(cache, chunks, causal_chunk_masks(chunks, h.device, self.window), self._gqa,
                              self.fused, causal=True, window=self.window),
            decode_attention(cache, write_positions, lengths, context, self.fused, self.window), count)
        hidden = self._layers(h, cos, sin, attend)
        logits = self.logits(torch.cat([last_rows(hidden[:count], chunks), hidden[count:]]))
        return logits[:len(chunks)], logits[len(chunks):]
