"""Fused GPU kernels for the decode hot path (Triton), each with a plain-torch twin used on CPU.

A decode step of a 7B model is ~200 matmuls plus ~1000 tiny elementwise kernels when written in torch;
fusing RMSNorm (+ the residual add before it), rotary embedding and SiLU-gating cuts the small kernels ~5x.
Decode attention reads each row's own length from the device, so it reads only the K/V that row has (a masked
SDPA reads the whole padded context) and one CUDA graph serves every context length.
The torch twins define the semantics (they match transformers' Llama modules); tests compare the two.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs fall back to torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def fused_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


# -- torch reference implementations ----------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def quick_gelu_torch(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, as transformers' ``QuickGELUActivation``: three elementwise passes in torch."""
    return x * torch.sigmoid(1.702 * x)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def decode_attention_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                           context: int | None = None, window: int | None = None,
                           slots: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row over that row's cached K/V.

    ``q`` [batch, heads, head_dim]; ``keys``/``values`` [slots, kv_heads, positions, head_dim], row i reading
    slot i (or ``slots[i]``: several rows may read one slot), in q's dtype or fp8; ``lengths`` [batch] positions
    attended per row (at least 1); ``context`` >= every length (computed when not given); ``window``: a sliding
    window (Mistral's), a row then attends only to its last ``window`` positions. Returns [batch, heads * head_dim]."""
    batch, heads, dim = q.shape
    if slots is not None:
        keys, values = keys[slots], values[slots]
    context = int(lengths.max()) if context is None else context
    positions = torch.arange(context, device=q.device)[None, :]
    mask = positions < lengths[:, None]
    if window is not None:
        mask &= positions >= lengths[:, None] - window
    mask = mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], keys[:batch, :, :context].to(q.dtype), values[:batch, :, :context].to(q.dtype),
        attn_mask=mask, enable_gqa=keys.shape[1] != heads)
    return out.reshape(batch, heads * dim)


if triton is not None:

    @triton.jit
    def _fp8_row(y, scale_ptr, row, limit):
        # A whole row held by one program as fp8 with its own scale (its absolute max maps to ``limit``): the one
        # quantization of activations, in _quantize_rows_kernel and in the kernels that emit fp8 themselves.
        yf = y.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(yf), axis=0), 1e-12) / limit
        tl.store(scale_ptr + row, scale)
        return tl.minimum(tl.maximum(yf / scale, -limit), limit)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, n_cols, eps, limit, HAS_RES: tl.constexpr,
                             FP8_OUT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
            tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (xf * rstd).to(x.dtype) * w
        if FP8_OUT:
            y = _fp8_row(y, scale_ptr, row, limit)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, a_ptr, b_ptr, w_ptr, bias_ptr, sum_ptr, out_ptr, n_cols, eps,
                               HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            x += tl.load(a_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x += tl.load(b_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (centered * rstd * w + bias).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, row_stride, head_stride, cos_stride,
                     HEADS: tl.constexpr, ROT_HALF: tl.constexpr, COS_SECOND: tl.constexpr, DIM: tl.constexpr,
                     REST: tl.constexpr):
        # One token, all its heads (HEADS >= n_heads, a power of two): one program per (token, head) made a
        # 3768-token prefill spend 74 us per call on scheduling 120k tiny programs. Dims [0, ROT_HALF) pair with
        # [ROT_HALF, 2 * ROT_HALF); the rest of each head is copied unrotated. The second half's cos/sin start
        # COS_SECOND values into a row (0: both halves share one table).
        token = tl.program_id(0)
        heads = tl.arange(0, HEADS)[:, None]
        used = heads < n_heads
        offs = tl.arange(0, ROT_HALF)[None, :]
        base = x_ptr + token * row_stride + heads * head_stride
        x1 = tl.load(base + offs, mask=used, other=0.0).to(tl.float32)
        x2 = tl.load(base + ROT_HALF + offs, mask=used, other=0.0).to(tl.float32)
        row = token * cos_stride + offs
        cos1 = tl.load(cos_ptr + row).to(tl.float32)
        cos2 = tl.load(cos_ptr + row + COS_SECOND).to(tl.float32)
        sin1 = tl.load(sin_ptr + row).to(tl.float32)
        sin2 = tl.load(sin_ptr + row + COS_SECOND).to(tl.float32)
        out = out_ptr + (token * n_heads + heads) * DIM
        tl.store(out + offs, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=used)
        tl.store(out + ROT_HALF + offs, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=used)
        rest = 2 * ROT_HALF + tl.arange(0, REST)[None, :]
        keep = used & (rest < DIM)
        tl.store(out + rest, tl.load(base + rest, mask=keep), mask=keep)

    @triton.jit
    def _silu_mul_block(gu_ptr, row, cols, mask, n_cols):
        gate = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
        return (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        tl.store(out_ptr + row * n_cols + cols, _silu_mul_block(gu_ptr, row, cols, mask, n_cols), mask=mask)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * tl.sigmoid(1.702 * x)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_fp8_kernel(gu_ptr, out_ptr, scale_ptr, n_cols, limit, BLOCK: tl.constexpr):
        # One program holds a whole row (BLOCK >= n_cols) for its scale: no half-precision copy to write and
        # read back for quantizing.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = _fp8_row(_silu_mul_block(gu_ptr, row, cols, mask, n_cols), scale_ptr, row, limit)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, acc_ptr, stats_ptr, q_row_stride,
                                       kv_slot_stride, kv_head_stride, kv_pos_stride, scale, n_heads, n_splits,
                                       window, slots_ptr, GROUP: tl.constexpr, HEADS: tl.constexpr,
                                       HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                                       PRECISION: tl.constexpr, WINDOWED: tl.constexpr, SLOTTED: tl.constexpr):
        # One (row, KV head, split): the GROUP query heads sharing that KV head (padded to HEADS >= 16 rows for
        # tensor-core dots), online softmax over positions [split * SPLIT, (split + 1) * SPLIT) below the row's
        # length. The loop stops at the length: a split past it only stores an empty partial (total 0), so a
        # short row in a long cache (kosmos2's ~150 of 768 positions) costs what its positions cost. WINDOWED
        # (a sliding window of ``window`` positions): the row starts at length - window, and the loop starts at
        # the block that holds that start (a split wholly before it stores an empty partial too). SLOTTED: the row
        # reads the slot ``slots_ptr`` names for it (a prompt chunk's rows all read theirs), else slot ``row``.
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + row)
        group = tl.arange(0, HEADS)
        used = group < GROUP
        heads = kv_head * GROUP + group
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * q_row_stride + heads[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None],
                    other=0.0)
        if SLOTTED:
            base = tl.load(slots_ptr + row) * kv_slot_stride + kv_head * kv_head_stride
        else:
            base = row * kv_slot_stride + kv_head * kv_head_stride
        m = tl.full([HEADS], -1.0e30, tl.float32)
        total = tl.zeros([HEADS], tl.float32)
        acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
        span = tl.minimum(tl.maximum(length - split * SPLIT, 0), SPLIT)
        begin = 0
        if WINDOWED:
            first = tl.maximum(length - window, 0)
            begin = tl.minimum(tl.maximum(first - split * SPLIT, 0), span) // BLOCK * BLOCK
        for offset in range(begin, span, BLOCK):
            positions = split * SPLIT + offset + tl.arange(0, BLOCK)
            valid = positions < length
            if WINDOWED:
                valid = valid & (positions >= first)
            where = base + positions[:, None] * kv_pos_stride + dims[None, :]
            k = tl.load(k_ptr + where, mask=valid[:, None], other=0.0).to(q.dtype)  # fp8 caches widen here
            scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, -1.0e30)
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.where(valid[None, :], tl.exp(scores - m_new[:, None]), 0.0)
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + where, mask=valid[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
        part = (row * n_heads + heads) * n_splits + split
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=used[:, None])
        tl.store(stats_ptr + part * 2, m, mask=used)
        tl.store(stats_ptr + part * 2 + 1, total, mask=used)

    @triton.jit
    def _decode_attention_merge_kernel(acc_ptr, stats_ptr, out_ptr, n_heads, n_splits, HEAD_DIM: tl.constexpr,
                                       SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        used = splits < n_splits
        first = (row * n_heads + head) * n_splits
        m = tl.load(stats_ptr + (first + splits) * 2, mask=used, other=-1.0e30)
        total = tl.load(stats_ptr + (first + splits) * 2 + 1, mask=used, other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))  # splits past the row's length have total 0: weight x 0
        dims = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (first + splits)[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(out_ptr + (row * n_heads + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, slots_ptr, positions_ptr, n_heads, k_row_stride,
                         k_head_stride, v_row_stride, v_head_stride, slot_stride, head_stride, pos_stride, limit,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SATURATE: tl.constexpr):
        # Row r's K/V, all its heads (HEADS >= n_heads, a power of two), go to its slot at its position; SATURATE
        # clamps for fp8 storage. One program per (row, head) spent 74 us a layer of a 3768-token prefill on
        # scheduling 120k tiny programs, as the rotary kernel once did.
        row = tl.program_id(0)
        heads = tl.arange(0, HEADS)[:, None]
        used = heads < n_heads
        dims = tl.arange(0, HEAD_DIM)[None, :]
        slot = tl.load(slots_ptr + row)
        position = tl.load(positions_ptr + row)
        k = tl.load(k_ptr + row * k_row_stride + heads * k_head_stride + dims, mask=used).to(tl.float32)
        v = tl.load(v_ptr + row * v_row_stride + heads * v_head_stride + dims, mask=used).to(tl.float32)
        if SATURATE:
            k = tl.minimum(tl.maximum(k, -limit), limit)
            v = tl.minimum(tl.maximum(v, -limit), limit)
        where = slot * slot_stride + heads * head_stride + position * pos_stride + dims
        tl.store(keys_ptr + where, k.to(keys_ptr.dtype.element_ty), mask=used)
        tl.store(values_ptr + where, v.to(values_ptr.dtype.element_ty), mask=used)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, limit, BLOCK: tl.constexpr):
        # One program holds a whole row (BLOCK >= n_cols), as the norm and gating kernels with fp8 outputs do,
        # and quantizes it with the same _fp8_row.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, _fp8_row(x, scale_ptr, row, limit).to(out_ptr.dtype.element_ty),
                 mask=mask)


if triton is not None:

    @triton.jit
    def _fp8_weight_matmul_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, m, n, k, x_row_stride, ROWS: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        # out[r, j] = scale[j] * sum_i x[r, i] * w[j, i]: the fp8 weight widened in registers, the rows of x (at
        # most ROWS) kept in their dtype. One program per BLOCK_N outputs streams those weight rows once.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            inner = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + inner[None, :],
                        mask=(rows[:, None] < m) & (inner[None, :] < k), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * k + inner[None, :], mask=(cols[:, None] < n) & (inner[None, :] < k),
                        other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        scale = tl.load(scale_ptr + cols, mask=cols < n, other=0.0)
        tl.store(out_ptr + rows[:, None] * n + cols[None, :], (acc * scale[None, :]).to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))


if triton is not None:

    @triton.jit
    def _fp8_matmul_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, m, n, k, ROWS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[r, j] = x_scale[r] * w_scale[j] * sum_i x[r, i] * w[j, i], both fp8. Computed transposed: the
        # weight's BLOCK_N channels take the tensor cores' wide side and the few rows the narrow one, so a
        # decode batch of 17-64 rows streams the weight near bandwidth (cuBLAS's fp8 GEMM did not at these sizes).
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)
        acc = tl.zeros([BLOCK_N, ROWS], tl.float32)
        for start in range(0, k, BLOCK_K):
            inner = start + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * k + inner[None, :], mask=(cols[:, None] < n) & (inner[None, :] < k),
                        other=0.0)
            x = tl.load(x_ptr + rows[:, None] * k + inner[None, :], mask=(rows[:, None] < m) & (inner[None, :] < k),
                        other=0.0)
            acc += tl.dot(w, tl.trans(x))
        acc = acc * tl.load(w_scale_ptr + cols, mask=cols < n, other=0.0)[:, None]
        acc = acc * tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)[None, :]
        tl.store(out_ptr + rows[None, :] * n + cols[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[None, :] < m) & (cols[:, None] < n))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: Triton multiplies float32 in TF32 unless told
    otherwise (~1e-3 relative), where torch's float32 matmuls stay IEEE; a float32 engine must match them."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fp8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int | None = None,
                      block_k: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """``x @ (weight * scale).T`` for a few rows of ``x`` [rows <= 64, in] (fp16/bf16), ``weight`` fp8 [out, in]
    row-major and ``scale`` [out] float32: a weight-bandwidth-bound decode matmul that reads fp8 weights
    without quantizing ``x``. Tiles by default as a sweep found best on an H100
    (bench/results/h100-fp8-matmul-sweep.txt)."""
    rows, inner = x.shape
    outs = weight.shape[0]
    if not weight.is_contiguous():
        raise ValueError("fp8_weight_matmul: the weight must be [out, in] row-major")
    block_n = block_n or (64 if outs >= 16384 else 32)
    block_k = block_k or (512 if _fewer_tiles_than_sms(outs, block_n, x.device) else 256)
    padded_rows = max(16, triton.next_power_of_2(rows))
    num_stages = num_stages or _stages_that_fit(4 if block_k == 512 else 3,
                                                (block_n + padded_rows * x.element_size()) * block_k, x.device)
    out = torch.empty((rows, outs), dtype=x.dtype, device=x.device)
    _fp8_weight_matmul_kernel[(triton.cdiv(outs, block_n),)](
        x, weight, scale, out, rows, outs, inner, x.stride(0), ROWS=padded_rows,
        BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(x.dtype), num_warps=num_warps,
        num_stages=num_stages)
    return out


def fp8_matmul(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               out_dtype: torch.dtype, block_n: int = 64, block_k: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None) -> torch.Tensor:
    """``(x * x_scale) @ (weight * weight_scale).T`` for up to 64 rows: ``x`` fp8 [rows, in] with float32 scales
    [rows], ``weight`` fp8 [out, in] row-major with float32 scales [out]. Tiles from the variants compared on an
    H100 (bench/results/h100-fp8-gemm-variants.txt; llava's projections at 48 and 64 rows: 100-102 us a layer
    against 121-123 for ``torch._scaled_mm``, input quantization included in both)."""
    rows, inner = x.shape
    outs = weight.shape[0]
    if rows > 64 or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("fp8_matmul: at most 64 rows, contiguous x and [out, in] row-major weight")
    wide = outs >= 16384  # gate_up
    block_k = block_k or (128 if wide else 256)
    num_warps = num_warps or (8 if wide else 4)
    padded_rows = max(16, triton.next_power_of_2(rows))
    num_stages = num_stages or _stages_that_fit(6 if _fewer_tiles_than_sms(outs, block_n, x.device) else 3,
                                                (block_n + padded_rows) * block_k, x.device)
    out = torch.empty((rows, outs), dtype=out_dtype, device=x.device)
    _fp8_matmul_kernel[(triton.cdiv(outs, block_n),)](
        x, x_scale, weight, weight_scale, out, rows, outs, inner, ROWS=padded_rows,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


def _fewer_tiles_than_sms(outs: int, block_n: int, device: torch.device) -> bool:
    """Whether a decode matmul's output tiles (one program each) leave SMs idle. Those programs then stream
    more of the weight each and gain from deeper loads. On an H100 (``bench/results/h100-split-k-sweep.json``,
    ``h100-matmul-stages.txt``): llava's o and down projections at 64 rows 9.8-10.2 and 20.5 us with 5-6 stages
    against 11.5 and 28.2 with 3; the weight-only o at one row 9.5 us 512-deep against 11.2 256-deep.
    Projections with more tiles than SMs lose with either."""
    return triton.cdiv(outs, block_n) < _device_limits(device).sms


def _stages_that_fit(wanted: int, stage_bytes: int, device: torch.device) -> int:
    """``wanted`` software-pipeline stages of ``stage_bytes`` shared memory each, or as many as the device holds:
    Ada's 99 KB a block takes fewer than Hopper's 227 (Triton refuses a kernel past it)."""
    return max(1, min(wanted, _device_limits(device).shared_memory // stage_bytes))


class DeviceLimits(NamedTuple):
    sms: int
    shared_memory: int  # bytes a program may use, as Triton checks it


@functools.cache
def _device_limits(device: torch.device) -> DeviceLimits:
    if device.type != "cuda":  # Triton's interpreter: no limits that matter
        return DeviceLimits(sms=1, shared_memory=1 << 30)
    index = device.index if device.index is not None else torch.cuda.current_device()
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceLimits(torch.cuda.get_device_properties(index).multi_processor_count, shared)


def store_kv(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
             positions: torch.Tensor, limit: float) -> bool:
    """``keys[slots[r], :, positions[r]] = k[r]`` (and ``values`` from ``v``) for each row r of ``k``/``v``
    [rows, kv_heads, head_dim] in one kernel, saturating at ``limit`` when the cache is fp8. Returns False (having
    stored nothing) for layouts it does not take: a head_dim that is not a power of two, or non-unit strides
    within a head."""
    rows, heads, dim = k.shape
    if dim & (dim - 1) or k.stride(2) != 1 or v.stride(2) != 1 or keys.stride(3) != 1:
        return False
    _store_kv_kernel[(rows,)](
        k, v, keys, values, slots, positions, heads, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), limit, HEADS=triton.next_power_of_2(heads), HEAD_DIM=dim,
        SATURATE=keys.element_size() == 1, num_warps=4)
    return True


def quantize_rows_fp8(x: torch.Tensor, dtype: torch.dtype, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scaled fp8 of ``x`` [rows, cols] (contiguous): (values, float32 scales [rows, 1])."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=dtype, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(rows,)](x, out, scales, cols, limit, BLOCK=block, num_warps=_whole_row_warps(block))
    return out, scales


class AttentionTiles(NamedTuple):
    """Decode attention's tiles: positions per split (one program each), positions per loop iteration inside one,
    warps per program, and pipeline stages (None: 3 for an fp8 cache, 2 otherwise)."""

    split: int
    block: int
    warps: int
    stages: int | None = None


#: From tile sweeps on an H100 (32 KV heads; bench/results/h100-attention-sweep*.txt). Many rows: at llava's
#: 64 x 660 positions, 135 us a layer with an fp8 cache against 142 at 256-position splits and 167 at
#: (128, 64, 4); fp16 K/V 235 against 238 and 263. 512-position splits won for fp8 at every shape tried (head_dim
#: 64 and 128, 150-1500 positions, 16-64 rows: 4-11%) and tied or won for fp16
#: (bench/results/h100-attention-sweep-split512.txt).
ATTENTION_TILES_WIDE = AttentionTiles(512, 32, 2)
#: Few rows: long splits leave most SMs idle (one row: 32 x 3 programs with work), so splits get shorter:
#: 6.9 us a layer against 11.4 at one row (fp16; fp8 6.5 against 11.0).
ATTENTION_TILES_NARROW = AttentionTiles(64, 64, 4)
#: Rows x KV heads from which the wide tiles keep the GPU busy (8 rows of llava's 32 heads).
WIDE_ATTENTION_FROM = 256


def attention_tiles(batch: int, kv_heads: int) -> AttentionTiles:
    return ATTENTION_TILES_WIDE if batch * kv_heads >= WIDE_ATTENTION_FROM else ATTENTION_TILES_NARROW


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     tiles: AttentionTiles | None = None, window: int | None = None,
                     slots: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_attention_torch` as two kernels (split-KV flash decoding: partial softmax per split of
    the positions, then a merge). The grid depends on the cache's size, never on ``lengths``' values, so a
    CUDA graph captured once replays for any lengths. ``tiles``: :func:`attention_tiles` unless given;
    ``window``: a sliding window, as the twin's (a kernel of its own, so the unwindowed one is unchanged);
    ``slots``: each row's slot, read on the device (a kernel of its own too)."""
    batch, heads, dim = q.shape
    kv_heads, positions = keys.shape[1], keys.shape[2]
    tiles = tiles or attention_tiles(batch, kv_heads)
    splits = triton.cdiv(positions, tiles.split)
    q = q.contiguous()
    acc = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((batch, heads, splits, 2), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    _decode_attention_split_kernel[(batch, kv_heads, splits)](
        q, keys, values, lengths, acc, stats, q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        dim ** -0.5, heads, splits, window or 0, lengths if slots is None else slots, GROUP=group,
        HEADS=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, SPLIT=tiles.split, BLOCK=tiles.block,
        PRECISION=dot_precision(q.dtype), WINDOWED=window is not None, SLOTTED=slots is not None,
        num_warps=tiles.warps,
        num_stages=tiles.stages or (3 if keys.element_size() == 1 else 2))
    out = torch.empty((batch, heads * dim), dtype=q.dtype, device=q.device)
    _decode_attention_merge_kernel[(batch, heads)](acc, stats, out, heads, splits, HEAD_DIM=dim,
                                                   SPLITS=triton.next_power_of_2(splits), num_warps=1)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``residual += x`` (in place, when given) then RMSNorm of the sum (of ``x`` alone otherwise)."""
    out = torch.empty_like(x)
    _add_rms_norm(x, residual, weight, eps, out, None, 0.0)
    return out


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     dtype: torch.dtype, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` with its output per-row fp8, as :func:`quantize_rows_fp8` of it would be:
    (values ``dtype`` [rows, cols], float32 scales [rows, 1])."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    _add_rms_norm(x, residual, weight, eps, out, scales, limit)
    return out, scales


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  out: torch.Tensor, scales: torch.Tensor | None, limit: float) -> None:
    _add_rms_norm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out,
                                        scales if scales is not None else out, x.shape[-1], eps, limit,
                                        HAS_RES=residual is not None, FP8_OUT=scales is not None,
                                        BLOCK=triton.next_power_of_2(x.shape[-1]), num_warps=8)


def add_layer_norm(x: torch.Tensor, adds: tuple[torch.Tensor, torch.Tensor] | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + a + b, LayerNorm(x + a + b))`` for ``adds = (a, b)`` (a parallel block's attention and MLP
    outputs), or ``(x, LayerNorm(x))``; rows of ``x`` [rows, cols] contiguous. One kernel instead of three."""
    rows, cols = x.shape
    summed = torch.empty_like(x) if adds is not None else x
    out = torch.empty_like(x)
    a, b = adds if adds is not None else (x, x)
    _add_layer_norm_kernel[(rows,)](x, a.contiguous(), b.contiguous(), weight, bias, summed, out, cols, eps,
                                    HAS_ADD=adds is not None, BLOCK=triton.next_power_of_2(cols), num_warps=8)
    return summed, out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_half: int, cos_second: int) -> torch.Tensor:
    """The rotary kernel over ``x`` [tokens, heads, head_dim] (any strides on the first two dims); ``cos``/``sin``
    hold one row per token. Returns a contiguous tensor."""
    tokens, heads, dim = x.shape
    cos, sin = cos.reshape(tokens, -1).contiguous(), sin.reshape(tokens, -1).contiguous()
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    _rope_kernel[(tokens,)](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0),
                            HEADS=triton.next_power_of_2(heads), ROT_HALF=rot_half, COS_SECOND=cos_second, DIM=dim,
                            REST=triton.next_power_of_2(max(1, dim - 2 * rot_half)), num_warps=4)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rope_torch` fused: ``cos``/``sin`` [tokens, 1, head_dim], the whole head rotated."""
    half = x.shape[-1] // 2
    return _rotate(x, cos, sin, rot_half=half, cos_second=half)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first ``2 * cos.shape[-1]`` dims of each head of ``x`` [tokens, heads, head_dim],
    as moondream2's ``apply_rotary`` (fp32 math, half-split pairs sharing one table); ``cos``/``sin``
    [tokens, rotary_dim / 2] in float32. The rest of each head is copied."""
    return _rotate(x, cos, sin, rot_half=cos.shape[-1], cos_second=0)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    out = torch.empty((rows, width // 2), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width // 2, block))](gate_up, out, width // 2, BLOCK=block, num_warps=4)
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """:func:`quick_gelu_torch` in one pass (fp32 math, one rounding): a CLIP tower's MLP spends 22% of its time
    on the three passes otherwise (bench/results/h100-llava-vision-profile.txt)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 4096
    _quick_gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out


def silu_mul_fp8(gate_up: torch.Tensor, dtype: torch.dtype, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`silu_mul` with its output per-row fp8, as :func:`quantize_rows_fp8` of it would be: (values
    ``dtype`` [rows, width / 2], float32 scales [rows, 1])."""
    rows, width = gate_up.shape
    out = torch.empty((rows, width // 2), dtype=dtype, device=gate_up.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=gate_up.device)
    block = triton.next_power_of_2(width // 2)
    _silu_mul_fp8_kernel[(rows,)](gate_up, out, scales, width // 2, limit, BLOCK=block,
                                  num_warps=_whole_row_warps(block))
    return out, scales


def _whole_row_warps(block: int) -> int:
    """Warps for a program that holds a whole row of ``block`` values in registers (16 past 8192: llava's MLP)."""
    return 16 if block >= 8192 else 4
