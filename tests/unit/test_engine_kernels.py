"""triton_vlm.engine.kernels: the torch twins match transformers' Llama modules and plain attention; the fused
kernels (GPU-only in the engine) match the twins under Triton's interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

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


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_torch_is_each_rows_softmax_over_its_own_length(heads: int, kv_heads: int) -> None:
    batch, positions, dim = 4, 40, 16
    q = randn(batch, heads, dim, seed=7)
    keys = randn(batch + 1, kv_heads, positions, dim, seed=8)  # one slot more than rows: never read
    values = randn(batch + 1, kv_heads, positions, dim, seed=9)
    lengths = torch.tensor([1, 7, 40, 23])
    out = kernels.decode_attention_torch(q, keys, values, lengths)
    assert out.shape == (batch, heads * dim)
    for row in range(batch):
        n = int(lengths[row])
        for head in range(heads):
            kv = head // (heads // kv_heads)
            weights = torch.softmax(keys[row, kv, :n] @ q[row, head] / dim ** 0.5, dim=0)
            torch.testing.assert_close(out[row, head * dim:(head + 1) * dim], weights @ values[row, kv, :n])
    # An explicit context bound gives the same; positions past a row's length never count.
    torch.testing.assert_close(kernels.decode_attention_torch(q, keys, values, lengths, context=40), out)
    poisoned = keys.clone()
    poisoned[0, :, 1:] = 1e4
    torch.testing.assert_close(kernels.decode_attention_torch(q, poisoned, values, lengths)[0], out[0])


#: Every fused kernel against its torch twin; run by Triton's interpreter (on CPU tensors) in a fresh process,
#: since the interpreter is chosen when the kernels are defined.
_INTERPRETED_CHECK = r'''
import json
import torch
from triton_vlm.engine import kernels

g = torch.Generator().manual_seed(0)
def randn(*shape):
    return torch.randn(*shape, generator=g)

errors = {}
x, residual, weight = randn(3, 40), randn(3, 40), randn(40) + 1
summed = residual + x
out = kernels.add_rms_norm(x, residual, weight, 1e-6)
errors["add_rms_norm"] = (out - kernels.rms_norm_torch(summed, weight, 1e-6)).abs().max().item()
errors["add_rms_norm residual in place"] = (residual - summed).abs().max().item()
errors["rms_norm"] = (kernels.add_rms_norm(x, None, weight, 1e-5)
                      - kernels.rms_norm_torch(x, weight, 1e-5)).abs().max().item()
ln = torch.nn.LayerNorm(40)
with torch.no_grad():
    ln.weight.copy_(randn(40) + 1)
    ln.bias.copy_(randn(40))
attn_out, mlp_out = randn(3, 40), randn(3, 40)
summed, normed = kernels.add_layer_norm(x, (attn_out, mlp_out), ln.weight, ln.bias, 1e-5)
errors["add_layer_norm sum"] = (summed - (x + attn_out + mlp_out)).abs().max().item()
errors["add_layer_norm norm"] = (normed - ln(x + attn_out + mlp_out)).abs().max().item()
plain, normed = kernels.add_layer_norm(x, None, ln.weight, ln.bias, 1e-5)
errors["layer_norm"] = max((normed - ln(x)).abs().max().item(), float(plain is not x))
qkv = randn(5, 3 * 4 * 16)
q = qkv[:, :64].view(5, 4, 16)  # a strided view, as the engine passes it
cos, sin = randn(5, 1, 16), randn(5, 1, 16)
errors["rope"] = (kernels.rope(q, cos, sin) - kernels.rope_torch(q, cos, sin)).abs().max().item()
from triton_vlm.models.moondream2.text import apply_rotary, rotary_tables
for dim, rotary_dim in [(64, 32), (16, 8), (24, 8)]:  # moondream2's real and tiny heads, and an odd rest
    x = randn(5, 6 * dim).view(5, 6, dim)[:, ::2]  # strided heads
    cos, sin = rotary_tables(torch.tensor([[0, 1, 7, 100, 2047]]), rotary_dim)
    expected = apply_rotary(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    errors[f"partial_rope {dim}/{rotary_dim}"] = (kernels.partial_rope(x, cos[0], sin[0]) - expected).abs().max().item()
gate_up = randn(3, 2 * 1500)  # wider than one block
errors["silu_mul"] = (kernels.silu_mul(gate_up) - kernels.silu_mul_torch(gate_up)).abs().max().item()
for heads, kv_heads, positions in [(4, 4, 300), (8, 2, 129), (2, 1, 17)]:
    q, lengths = randn(3, heads, 32), torch.tensor([1, positions, max(1, positions // 3)])
    keys, values = randn(4, kv_heads, positions, 32), randn(4, kv_heads, positions, 32)
    expected = kernels.decode_attention_torch(q, keys, values, lengths)
    got = kernels.decode_attention(q, keys, values, lengths)
    errors[f"decode_attention {heads}/{kv_heads} heads, {positions} positions"] = (got - expected).abs().max().item()
# fp8: the interpreter's float -> e4m3 emulation is coarse (1.99 can come back 1.0 where torch and the GPU give
# 2.0; on the GPU the kernels match torch exactly: bench/gpu_fp8_probe.py), so fp8 results count as errors only
# past half the value (and 1/64, for e4m3's smallest steps). A value in the wrong slot or position, an
# unsaturated 1000 (NaN) or a missing store still count.
from triton_vlm.engine.quantization import FP8, FP8_MAX, Fp8Weight, to_storage
def beyond_fp8_rounding(got, expected):
    return ((got.float() - expected.float()).abs() - expected.float().abs() / 2 - 1 / 64).clamp(min=0).max().item()
for dtype in (torch.float32, FP8):
    keys, values = torch.zeros(3, 2, 10, 16, dtype=dtype), torch.zeros(3, 2, 10, 16, dtype=dtype)
    kv = randn(4, 3 * 2 * 16).view(4, 3, 2, 16)
    k, v = kv[:, 1], kv[:, 2]  # strided, as the engine's v is
    k[0, 0, 0] = 1000.0  # past fp8's range: saturates
    slots, positions = torch.tensor([2, 0, 2, 1]), torch.tensor([0, 9, 5, 3])
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[slots, :, positions] = to_storage(k, dtype)
    expected_values[slots, :, positions] = to_storage(v, dtype)
    assert kernels.store_kv(k, v, keys, values, slots, positions, FP8_MAX)
    errors[f"store_kv {dtype}"] = max(beyond_fp8_rounding(keys, expected_keys),
                                      beyond_fp8_rounding(values, expected_values))
x = randn(5, 1500) * 3  # wider than one block
quantized, scales = kernels.quantize_rows_fp8(x, FP8, FP8_MAX)
expected_scales = x.abs().amax(dim=1, keepdim=True) / FP8_MAX
errors["quantize_rows scales"] = (scales - expected_scales).abs().max().item()
errors["quantize_rows values"] = beyond_fp8_rounding(quantized, to_storage(x / expected_scales, FP8))
weight = Fp8Weight.quantize(randn(48, 600))
a = randn(3, 600)
expected = a @ weight.dequantize().t()  # relative: sums of 600 products in another order
errors["fp8_weight_matmul"] = ((kernels.fp8_weight_matmul(a, weight.data.t(), weight.scale[0], 16, 256) - expected)
                               .abs().max() / expected.abs().max()).item()
q, lengths = randn(3, 4, 32), torch.tensor([1, 300, 100])
keys, values = randn(4, 4, 300, 32).to(FP8), randn(4, 4, 300, 32).to(FP8)
errors["decode_attention fp8 cache"] = (kernels.decode_attention(q, keys, values, lengths)
                                        - kernels.decode_attention_torch(q, keys, values, lengths)).abs().max().item()
print(json.dumps(errors))
'''


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="Triton (a test dependency) has wheels for Linux x86-64 only")
def test_fused_kernels_match_their_torch_twins_in_the_triton_interpreter() -> None:
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 20
    for name, error in errors.items():
        assert error < 1e-5, f"{name}: max abs error {error}"


def test_engine_keeps_sdpa_off_cudnn_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's SDPA plans per shape (36 ms per new prompt length on an H100): the engine turns it off on CUDA."""
    from triton_vlm.engine.attention import avoid_per_shape_attention_plans

    calls: list[bool] = []
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: not calls)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    avoid_per_shape_attention_plans(torch.device("cpu"))
    assert calls == []
    avoid_per_shape_attention_plans(torch.device("cuda", 0))
    avoid_per_shape_attention_plans(torch.device("cuda", 0))  # already off: nothing to do
    assert calls == [False]


def test_prefill_takes_variable_length_flash_attention_only_where_flash_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.engine.attention import flash_varlen_available

    assert not flash_varlen_available(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert not flash_varlen_available(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert flash_varlen_available(torch.device("cuda:0"))
