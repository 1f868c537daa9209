"""triton_vlm.engine.kernels: the torch twins match transformers' Llama modules; fused kernels are GPU-only."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from triton_vlm.engine import kernels

TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_llama_rms_norm(dtype: torch.dtype, eps: float) -> None:
    hidden = 48
    norm = LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, seed=1) + 1.0)
    norm = norm.to(dtype)
    x = randn(7, hidden, dtype=dtype, seed=2) * 3
    expected = norm(x)
    out = kernels.rms_norm_torch(x, norm.weight, eps)
    assert out.dtype == expected.dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    # Not a no-op: the rows really are normalized.
    assert not torch.allclose(out.float(), x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, head_dim = 9, 4, 2, 16
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 2, 3, 17, 40, 41, 100, 255])
    q = randn(tokens, heads, head_dim, dtype=dtype, seed=3)
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, seed=4)
    cos, sin = rotary(q, positions[None, :])  # [1, tokens, head_dim]
    # transformers' layout: [batch, heads, tokens, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_t, sin_t = cos[0][:, None, :], sin[0][:, None, :]  # the engine's [tokens, 1, head_dim]
    torch.testing.assert_close(kernels.rope_torch(q, cos_t, sin_t), q_hf[0].transpose(0, 1), **TOLERANCE[dtype])
    torch.testing.assert_close(kernels.rope_torch(k, cos_t, sin_t), k_hf[0].transpose(0, 1), **TOLERANCE[dtype])
    # Position 0 is the identity rotation; later positions really rotate.
    torch.testing.assert_close(kernels.rope_torch(q, cos_t, sin_t)[0], q[0])
    assert not torch.allclose(kernels.rope_torch(q, cos_t, sin_t)[5].float(), q[5].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_silu_gate_times_up(dtype: torch.dtype) -> None:
    gate = randn(5, 24, dtype=dtype, seed=5)
    up = randn(5, 24, dtype=dtype, seed=6)
    out = kernels.silu_mul_torch(torch.cat([gate, up], dim=-1))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, **TOLERANCE[dtype])
    torch.testing.assert_close(out.float(), (gate.float() * torch.sigmoid(gate.float()) * up.float()),
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_fused_kernels_are_gpu_only() -> None:
    assert kernels.fused_available(torch.device("cpu")) is False
    # On a CUDA device they depend on Triton being importable; never on a CPU tensor.
    assert kernels.fused_available(torch.device("cuda")) is (kernels.triton is not None)
