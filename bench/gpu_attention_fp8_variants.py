"""GPU probe: two other ways to run decode attention over an fp8 cache (neither faster; results/h100-attention-fp8-variants.txt).

python -m bench.gpu_attention_fp8_variants

An fp8 cache reads half fp16's bytes, yet the engine's split kernel moves them at ~2.4 TB/s against ~2.9. It pads
the GROUP query heads of a KV head to 16 rows for tl.dot, widening K/V to fp16 on the way to the tensor cores.
Variants, at llava's c64 shape (head_dim 128 and 64):
- "cuda cores": one head per program, fp32 FMAs on K/V widened in registers (no tensor cores, no shared memory);
- "fp8 dots" (fp8 caches): fp8 x fp8 tensor-core dots, the query quantized per head and the softmax weights
  scaled into e4m3, so K/V are never widened (at a cost in accuracy).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from bench.gpu_engine_profile import graph_timed as timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import FP8


@triton.jit
def _program(lengths_ptr, kv_slot_stride, kv_head_stride, SPLIT: tl.constexpr):
    """This program's (row, head, split), the row's length, its K/V base offset and the positions it covers."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    span = tl.minimum(tl.maximum(length - split * SPLIT, 0), SPLIT)
    return row, head, split, length, row * kv_slot_stride + head * kv_head_stride, span


@triton.jit
def _split_cuda_cores(q_ptr, k_ptr, v_ptr, lengths_ptr, acc_ptr, stats_ptr, q_row_stride, kv_slot_stride,
                      kv_head_stride, kv_pos_stride, scale, n_heads, n_splits, HEAD_DIM: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    row, head, split, length, base, span = _program(lengths_ptr, kv_slot_stride, kv_head_stride, SPLIT)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * q_row_stride + head * HEAD_DIM + dims).to(tl.float32) * scale
    m = tl.full([], -1.0e30, tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for offset in range(0, span, BLOCK):
        positions = split * SPLIT + offset + tl.arange(0, BLOCK)
        valid = positions < length
        where = base + positions[:, None] * kv_pos_stride + dims[None, :]
        k = tl.load(k_ptr + where, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.where(valid, tl.exp(scores - m_new), 0.0)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + where, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    part = (row * n_heads + head) * n_splits + split
    tl.store(acc_ptr + part * HEAD_DIM + dims, acc)
    tl.store(stats_ptr + part * 2, m)
    tl.store(stats_ptr + part * 2 + 1, total)


@triton.jit
def _split_fp8_dots(q_ptr, k_ptr, v_ptr, lengths_ptr, acc_ptr, stats_ptr, q_row_stride, kv_slot_stride,
                    kv_head_stride, kv_pos_stride, scale, n_heads, n_splits, HEAD_DIM: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # An fp8 cache multiplied as fp8 on the tensor cores: the query quantized per head, the softmax weights
    # times 256 (so that weights down to ~1e-5 survive e4m3), no widening of K/V.
    row, head, split, length, base, span = _program(lengths_ptr, kv_slot_stride, kv_head_stride, SPLIT)
    pad = tl.arange(0, 16)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * q_row_stride + head * HEAD_DIM + pad[:, None] * 0 + dims[None, :],
                mask=pad[:, None] < 1, other=0.0).to(tl.float32)
    q_scale = tl.maximum(tl.max(tl.max(tl.abs(q), axis=1), axis=0), 1e-12) / 448.0
    q8 = (q / q_scale).to(k_ptr.dtype.element_ty)
    m = tl.full([16], -1.0e30, tl.float32)
    total = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    for offset in range(0, span, BLOCK):
        positions = split * SPLIT + offset + tl.arange(0, BLOCK)
        valid = positions < length
        where = base + positions[:, None] * kv_pos_stride + dims[None, :]
        k = tl.load(k_ptr + where, mask=valid[:, None], other=0.0)
        scores = tl.where(valid[None, :], tl.dot(q8, tl.trans(k)) * (q_scale * scale), -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.where(valid[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + where, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot((p * 256.0).to(v.dtype), v)
        total = total * alpha + tl.sum(p, axis=1)
        m = m_new
    part = (row * n_heads + head) * n_splits + split
    first = pad < 1
    tl.store(acc_ptr + part * HEAD_DIM + pad[:, None] * 0 + dims[None, :], acc / 256.0, mask=first[:, None])
    tl.store(stats_ptr + part * 2 + pad * 0, m, mask=first)
    tl.store(stats_ptr + part * 2 + 1 + pad * 0, total, mask=first)


def attention_fp8_dots(q, keys, values, lengths, split: int, block: int, warps: int, stages: int):  # type: ignore[no-untyped-def]
    return _attention(_split_fp8_dots, q, keys, values, lengths, split, block, warps, stages)


def attention_cuda_cores(q, keys, values, lengths, split: int, block: int, warps: int, stages: int):  # type: ignore[no-untyped-def]
    return _attention(_split_cuda_cores, q, keys, values, lengths, split, block, warps, stages)


def _attention(kernel, q, keys, values, lengths, split: int, block: int, warps: int, stages: int):  # type: ignore[no-untyped-def]
    batch, heads, dim = q.shape
    positions = keys.shape[2]
    splits = triton.cdiv(positions, split)
    acc = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((batch, heads, splits, 2), dtype=torch.float32, device=q.device)
    kernel[(batch, heads, splits)](
        q, keys, values, lengths, acc, stats, q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        dim ** -0.5, heads, splits, HEAD_DIM=dim, SPLIT=split, BLOCK=block, num_warps=warps, num_stages=stages)
    out = torch.empty((batch, heads * dim), dtype=q.dtype, device=q.device)
    kernels._decode_attention_merge_kernel[(batch, heads)](acc, stats, out, heads, splits, HEAD_DIM=dim,
                                                           SPLITS=triton.next_power_of_2(splits), num_warps=1)
    return out


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for batch, context, dim in ((64, 660, 128), (64, 660, 64)):
        heads, positions = 32, 769
        q = torch.randn(batch, heads, dim, device=device, dtype=torch.float16)
        lengths = torch.full((batch,), context, device=device)
        for dtype in (torch.float16, FP8):
            keys = torch.randn(batch, heads, positions, dim, device=device, dtype=torch.float16).to(dtype)
            values = torch.randn(batch, heads, positions, dim, device=device, dtype=torch.float16).to(dtype)
            moved = 2 * batch * heads * context * dim * keys.element_size()
            reference = kernels.decode_attention_torch(q, keys, values, lengths)
            current = timed(lambda: kernels.decode_attention(q, keys, values, lengths)) * 1e3
            engine_error = float((kernels.decode_attention(q, keys, values, lengths).float() - reference.float()).abs().max())
            print(f"batch {batch} dim {dim} {str(dtype):20s}: engine {current:6.1f} us ({moved / current / 1e6:.2f} TB/s, "
                  f"err {engine_error:.1e})", flush=True)
            variants = {"cuda cores": attention_cuda_cores, **({"fp8 dots": attention_fp8_dots} if dtype == FP8 else {})}
            for name, variant in variants.items():
                results = []
                for split, block, warps, stages in itertools.product((256, 512), (32, 64), (2, 4), (2, 3)):
                    try:
                        out = variant(q, keys, values, lengths, split, block, warps, stages)
                        error = float((out.float() - reference.float()).abs().max())
                        us = timed(lambda: variant(q, keys, values, lengths, split, block, warps, stages)) * 1e3
                    except Exception as exc:  # noqa: BLE001
                        print(f"  {split}/{block}/{warps}/{stages}: {type(exc).__name__} {str(exc)[:200]}", flush=True)
                        continue
                    results.append((us, split, block, warps, stages, error))
                results.sort()
                print(f"  {name} best: " + ", ".join(f"{r[0]:.1f} us {moved / r[0] / 1e6:.2f} TB/s @{r[1]}/{r[2]}/{r[3]}/{r[4]} "
                                                    f"(err {r[5]:.1e})" for r in results[:4]), flush=True)


if __name__ == "__main__":
    main()
