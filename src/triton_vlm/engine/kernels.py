"""Fused GPU kernels for the decode hot path (Triton), each with a plain-torch twin used on CPU.

A decode step of a 7B model is ~200 matmuls plus ~1000 tiny elementwise kernels when written in torch;
fusing RMSNorm (+ the residual add before it), rotary embedding and SiLU-gating cuts the small kernels ~5x.
The torch twins define the semantics (they match transformers' Llama modules); tests compare the two.
"""

from __future__ import annotations

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


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, HAS_RES: tl.constexpr,
                             BLOCK: tl.constexpr):
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
        tl.store(out_ptr + row * n_cols + cols, y, mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, row_stride, head_stride,
                     HALF: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, HALF)
        base = x_ptr + token * row_stride + head * head_stride
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        cos1 = tl.load(cos_ptr + token * 2 * HALF + offs).to(tl.float32)
        cos2 = tl.load(cos_ptr + token * 2 * HALF + HALF + offs).to(tl.float32)
        sin1 = tl.load(sin_ptr + token * 2 * HALF + offs).to(tl.float32)
        sin2 = tl.load(sin_ptr + token * 2 * HALF + HALF + offs).to(tl.float32)
        out = out_ptr + (token * n_heads + head) * 2 * HALF
        tl.store(out + offs, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty))
        tl.store(out + HALF + offs, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * n_cols + cols, silu * up, mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``residual += x`` (in place, when given) then RMSNorm of the sum (of ``x`` alone otherwise)."""
    out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[-1])
    _add_rms_norm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out, x.shape[-1],
                                        eps, HAS_RES=residual is not None, BLOCK=block, num_warps=8)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [tokens, heads, head_dim] (any strides on the first two dims);
    ``cos``/``sin`` [tokens, 1, head_dim] contiguous. Returns a contiguous tensor."""
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    _rope_kernel[(tokens, heads)](x, cos.contiguous(), sin.contiguous(), out, heads, x.stride(0), x.stride(1),
                                  HALF=dim // 2, num_warps=1)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    out = torch.empty((rows, width // 2), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width // 2, block))](gate_up, out, width // 2, BLOCK=block, num_warps=4)
    return out
