"""Every fused kernel of ``triton_vlm.engine.kernels`` against its torch twin: ``kernel_errors(device, dtype)``.

Run two ways: by Triton's interpreter on CPU tensors (tests/unit/test_engine_kernels.py starts this file as a
script with ``TRITON_INTERPRET=1``, since the interpreter is chosen when the kernels are defined), and compiled
on a CUDA device (tests/gpu/test_kernels_gpu.py imports it).
"""

from __future__ import annotations

import json
import math

import torch

from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import FP8, FP8_MAX, Fp8Weight, quantize_rows, to_storage
from triton_vlm.models.moondream2.text import apply_rotary, rotary_tables


def beyond_fp8_rounding(got: torch.Tensor, expected: torch.Tensor) -> float:
    """fp8 differences past half the value (and 1/64, e4m3's smallest steps).

    The interpreter's float -> e4m3 emulation is coarse (1.99 can come back 1.0 where torch and the GPU give
    2.0), so fp8 results count as errors only past that. A value in the wrong slot or position, an unsaturated
    1000 (NaN) or a missing store still count."""
    found = ((got.float() - expected.float()).abs() - expected.float().abs() / 2 - 1 / 64).clamp(min=0).max().item()
    return math.inf if math.isnan(found) else found


def kernel_errors(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Max abs error of each fused kernel against its twin, on inputs of ``dtype`` on ``device`` (the matmul's
    is relative: sums of 600 products in another order)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def error(got: torch.Tensor, expected: torch.Tensor) -> float:
        found = (got.float() - expected.float()).abs().max().item()
        return math.inf if math.isnan(found) else found  # max() over several checks would drop a NaN

    errors: dict[str, float] = {}
    x, residual, weight = randn(3, 40), randn(3, 40), randn(40) + 1
    summed = residual + x
    errors["add_rms_norm"] = error(kernels.add_rms_norm(x, residual, weight, 1e-6),
                                   kernels.rms_norm_torch(summed, weight, 1e-6))
    errors["add_rms_norm residual in place"] = error(residual, summed)
    errors["rms_norm"] = error(kernels.add_rms_norm(x, None, weight, 1e-5), kernels.rms_norm_torch(x, weight, 1e-5))
    ln = torch.nn.LayerNorm(40, device=device, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(randn(40) + 1)
        ln.bias.copy_(randn(40))
    attn_out, mlp_out = randn(3, 40), randn(3, 40)
    summed, normed = kernels.add_layer_norm(x, (attn_out, mlp_out), ln.weight, ln.bias, 1e-5)
    errors["add_layer_norm sum"] = error(summed, x.float() + attn_out.float() + mlp_out.float())
    errors["add_layer_norm norm"] = error(normed, ln(x + attn_out + mlp_out))
    plain, normed = kernels.add_layer_norm(x, None, ln.weight, ln.bias, 1e-5)
    errors["layer_norm"] = max(error(normed, ln(x)), float(plain is not x))
    qkv = randn(5, 3 * 4 * 16)
    q = qkv[:, :64].view(5, 4, 16)  # a strided view, as the engine passes it
    cos, sin = randn(5, 1, 16), randn(5, 1, 16)
    errors["rope"] = error(kernels.rope(q, cos, sin), kernels.rope_torch(q, cos, sin))
    for dim, rotary_dim in [(64, 32), (16, 8), (24, 8)]:  # moondream2's real and tiny heads, and an odd rest
        x = randn(5, 6 * dim).view(5, 6, dim)[:, ::2]  # strided heads
        cos, sin = (t.to(device=device, dtype=dtype)
                    for t in rotary_tables(torch.tensor([[0, 1, 7, 100, 2047]]), rotary_dim))
        expected = apply_rotary(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        errors[f"partial_rope {dim}/{rotary_dim}"] = error(kernels.partial_rope(x, cos[0], sin[0]), expected)
    gate_up = randn(3, 2 * 1500)  # wider than one block
    errors["silu_mul"] = error(kernels.silu_mul(gate_up), kernels.silu_mul_torch(gate_up))
    activations = randn(3, 5000) * 2  # past one block, with a tail; outputs to ~8 (float16 steps of 4e-3)
    errors["quick_gelu"] = error(kernels.quick_gelu(activations), kernels.quick_gelu_torch(activations))
    for heads, kv_heads, positions in [(4, 4, 300), (8, 2, 129), (2, 1, 17)]:
        q, lengths = randn(3, heads, 32), torch.tensor([1, positions, max(1, positions // 3)], device=device)
        keys, values = randn(4, kv_heads, positions, 32), randn(4, kv_heads, positions, 32)
        expected = kernels.decode_attention_torch(q, keys, values, lengths)
        errors[f"decode_attention {heads}/{kv_heads} heads, {positions} positions"] = max(
            error(kernels.decode_attention(q, keys, values, lengths, tiles), expected)  # narrow and wide splits
            for tiles in (kernels.ATTENTION_TILES_NARROW, kernels.ATTENTION_TILES_WIDE))
    for heads, kv_heads, positions, window in [(8, 2, 300, 37), (4, 4, 600, 100)]:  # Mistral's sliding window
        # Rows whose window starts inside a later split, inside the first, or covers the whole row.
        q, lengths = randn(3, heads, 32), torch.tensor([positions, 90, 1], device=device)
        keys, values = randn(4, kv_heads, positions, 32), randn(4, kv_heads, positions, 32)
        expected = kernels.decode_attention_torch(q, keys, values, lengths, window=window)
        errors[f"decode_attention {heads}/{kv_heads} heads, {positions} positions, window {window}"] = max(
            error(kernels.decode_attention(q, keys, values, lengths, tiles, window=window), expected)
            for tiles in (kernels.ATTENTION_TILES_NARROW, kernels.ATTENTION_TILES_WIDE))
    for cache_dtype in (dtype, FP8):
        keys = torch.zeros(3, 3, 10, 16, dtype=cache_dtype, device=device)  # 3 KV heads: not a power of two
        values = torch.zeros_like(keys)
        kv = randn(4, 3 * 3 * 16).view(4, 3, 3, 16)
        k, v = kv[:, 1], kv[:, 2]  # strided, as the engine's v is
        k[0, 0, 0] = 1000.0  # past fp8's range: saturates
        slots, positions = torch.tensor([2, 0, 2, 1], device=device), torch.tensor([0, 9, 5, 3], device=device)
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_keys[slots, :, positions] = to_storage(k, cache_dtype)
        expected_values[slots, :, positions] = to_storage(v, cache_dtype)
        assert kernels.store_kv(k, v, keys, values, slots, positions, FP8_MAX)
        differ = beyond_fp8_rounding if cache_dtype == FP8 else error  # the model's dtype is stored as it is
        errors[f"store_kv {'fp8' if cache_dtype == FP8 else 'model dtype'}"] = max(
            differ(keys, expected_keys), differ(values, expected_values))
    x = randn(5, 1500) * 3  # a row wider than the plain kernels' blocks, and no power of two
    quantized, scales = kernels.quantize_rows_fp8(x, FP8, FP8_MAX)
    expected_scales = x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    errors["quantize_rows scales"] = error(scales, expected_scales)
    errors["quantize_rows values"] = beyond_fp8_rounding(quantized, to_storage(x.float() / expected_scales, FP8))
    # The norm and the gating with fp8 outputs: what the quantizing kernel makes of their plain outputs.
    x, residual, weight = randn(3, 40), randn(3, 40), randn(40) + 1
    plain_residual = residual.clone()
    values, scales = kernels.add_rms_norm_fp8(x, residual, weight, 1e-6, FP8, FP8_MAX)
    expected_values, expected_scales = kernels.quantize_rows_fp8(
        kernels.add_rms_norm(x, plain_residual, weight, 1e-6), FP8, FP8_MAX)
    errors["add_rms_norm fp8"] = max(error(scales, expected_scales), beyond_fp8_rounding(values, expected_values),
                                     error(residual, plain_residual))
    values, scales = kernels.silu_mul_fp8(gate_up, FP8, FP8_MAX)
    expected_values, expected_scales = kernels.quantize_rows_fp8(kernels.silu_mul(gate_up), FP8, FP8_MAX)
    errors["silu_mul fp8"] = max(error(scales, expected_scales), beyond_fp8_rounding(values, expected_values))
    weight = Fp8Weight.quantize(randn(48, 600))
    a = randn(3, 600)
    expected = a.float() @ weight.dequantize().float().t()
    errors["fp8_weight_matmul"] = error(kernels.fp8_weight_matmul(a, weight.data.t(), weight.scale[0], 16, 256),
                                        expected) / expected.abs().max().item()
    values, scales = quantize_rows(a)  # per-row fp8 (its kernel is checked above)
    expected = (values.float() * scales) @ weight.dequantize().float().t()
    errors["fp8_matmul"] = error(kernels.fp8_matmul(values, scales[:, 0], weight.data.t(), weight.scale[0], dtype,
                                                    block_n=16, block_k=256),
                                 expected) / expected.abs().max().item()
    q, lengths = randn(3, 4, 32), torch.tensor([1, 300, 100], device=device)
    keys, values = randn(4, 4, 300, 32).to(FP8), randn(4, 4, 300, 32).to(FP8)
    errors["decode_attention fp8 cache"] = error(kernels.decode_attention(q, keys, values, lengths),
                                                 kernels.decode_attention_torch(q, keys, values, lengths))
    return errors


if __name__ == "__main__":
    print(json.dumps(kernel_errors()))
