"""GPU probe: other ways to run llava-7b's fp8 projections at decode and prefill sizes (for engine work).

python -m bench.gpu_fp8_gemm_variants

Decode rows (1..64), per projection, microseconds of CUDA-graph replays:
- ``engine``: what ``quantization.linear`` does at that size.
- ``scaled``: inputs quantized per row, ``torch._scaled_mm(x, W^T)`` (the engine's path before the fp8 kernel).
- ``swap``: the same product transposed, ``_scaled_mm(W, x^T)`` then back to [rows, out]: the weight's output
  channels fill the tensor cores' wide M side, the few rows the narrow N side.
- ``wo``: the engine's weight-only kernel (kernels.fp8_weight_matmul), at its default tiles.
- ``wo_swap`` / ``w8a8_swap``: Triton kernels in the swapped orientation, weight-only and fp8 x fp8, best of a
  few tiles (the second became kernels.fp8_matmul).
Prefill rows (628, 4096): dense fp16 against ``scaled``, in TFLOP/s.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.gpu_engine_profile import graph_timed as timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import Fp8Weight, linear, quantize_rows

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


@triton.jit
def _swapped_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, m, n, k, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, FP8_INPUT: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([BLOCK_N, ROWS], tl.float32)
    for start in range(0, k, BLOCK_K):
        inner = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * k + inner[None, :], mask=(cols[:, None] < n) & (inner[None, :] < k),
                    other=0.0)
        x = tl.load(x_ptr + rows[:, None] * k + inner[None, :], mask=(rows[:, None] < m) & (inner[None, :] < k),
                    other=0.0)
        if FP8_INPUT:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(w.to(x.dtype), tl.trans(x))
    acc = acc * tl.load(ws_ptr + cols, mask=cols < n, other=0.0)[:, None]
    if FP8_INPUT:
        acc = acc * tl.load(xs_ptr + rows, mask=rows < m, other=0.0)[None, :]
    tl.store(out_ptr + rows[None, :] * n + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[None, :] < m) & (cols[:, None] < n))


def swapped(x, scales, weight, wscale, out_dtype, block_n, block_k, warps, stages):  # type: ignore[no-untyped-def]
    rows, inner = x.shape
    outs = weight.shape[0]
    out = torch.empty((rows, outs), dtype=out_dtype, device=x.device)
    _swapped_kernel[(triton.cdiv(outs, block_n),)](
        x, scales if scales is not None else wscale, weight, wscale, out, rows, outs, inner,
        ROWS=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k, FP8_INPUT=scales is not None,
        num_warps=warps, num_stages=stages)
    return out


def best_swapped(x, scales, weight, wscale, reference):  # type: ignore[no-untyped-def]
    results = []
    for block_n, block_k, warps, stages in itertools.product((64, 128), (128, 256), (4, 8), (3, 4)):
        try:
            out = swapped(x, scales, weight, wscale, torch.float16, block_n, block_k, warps, stages)
            error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
            us = timed(lambda: swapped(x, scales, weight, wscale, torch.float16, block_n, block_k, warps,
                                       stages)) * 1e3
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is skipped
            print(f"    tile {block_n}/{block_k}/{warps}/{stages}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        results.append((us, f"{block_n}/{block_k}/{warps}/{stages}", error))
    return min(results) if results else (float("nan"), "-", float("nan"))


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    totals: dict[tuple[str, int], float] = {}
    for name, (outs, inner) in SHAPES.items():
        dense = torch.randn(outs, inner, device=device, dtype=torch.float16) * 0.02
        quantized = Fp8Weight.quantize(dense)
        weight_rows, wscale = quantized.data.t(), quantized.scale[0]  # [out, in] row-major, [out]
        wscale_col = quantized.scale.t().contiguous()  # [out, 1]
        for rows in (1, 16, 32, 48, 64):
            x = torch.randn(rows, inner, device=device, dtype=torch.float16)
            reference = F.linear(x, quantized.dequantize())

            def scaled() -> torch.Tensor:
                values, scales = quantize_rows(x)
                return torch._scaled_mm(values, quantized.data, scale_a=scales, scale_b=quantized.scale,
                                        out_dtype=torch.float16)

            def swap() -> torch.Tensor:
                values, scales = quantize_rows(x)
                return torch._scaled_mm(weight_rows, values.t(), scale_a=wscale_col, scale_b=scales.t(),
                                        out_dtype=torch.float16).t().contiguous()

            row = {"dense": timed(lambda: F.linear(x, dense)) * 1e3, "scaled": timed(scaled) * 1e3}
            if rows % 16 == 0:
                error = float((swap().float() - reference.float()).abs().max() / reference.float().abs().max())
                row["swap"] = timed(swap) * 1e3
                row["swap_err"] = error
            row["engine"] = timed(lambda: linear(x, quantized)) * 1e3
            try:  # its default tiles at 64 rows and a long input exceed shared memory (the engine stops at 16)
                row["wo"] = timed(lambda: kernels.fp8_weight_matmul(x, weight_rows, wscale)) * 1e3
            except triton.runtime.errors.OutOfResources:
                pass
            us, tile, error = best_swapped(x, None, weight_rows, wscale, reference)
            row["wo_swap"], row["wo_swap_tile"], row["wo_swap_err"] = us, tile, error
            values, scales = quantize_rows(x)
            us, tile, error = best_swapped(values, scales[:, 0].contiguous(), weight_rows, wscale, reference)
            quant_us = timed(lambda: quantize_rows(x)) * 1e3
            row["w8a8_swap"], row["w8a8_swap_tile"], row["w8a8_swap_err"] = us + quant_us, tile, error
            print(f"{name:8s} rows {rows:2d}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) and not k.endswith("err") else
                f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            for key, value in row.items():
                if isinstance(value, float) and not key.endswith("err"):
                    totals[(key, rows)] = totals.get((key, rows), 0.0) + value
    print("per layer (sum of the four projections), us:")
    for rows in (1, 16, 32, 48, 64):
        print(f"  rows {rows:2d}: " + ", ".join(f"{k} {v:.1f}" for (k, r), v in totals.items() if r == rows))
    for rows in (628, 4096):
        flops = 0
        t_dense = t_scaled = 0.0
        for name, (outs, inner) in SHAPES.items():
            dense = torch.randn(outs, inner, device=device, dtype=torch.float16) * 0.02
            quantized = Fp8Weight.quantize(dense)
            x = torch.randn(rows, inner, device=device, dtype=torch.float16)

            def scaled() -> torch.Tensor:
                values, scales = quantize_rows(x)
                return torch._scaled_mm(values, quantized.data, scale_a=scales, scale_b=quantized.scale,
                                        out_dtype=torch.float16)
            t_dense += timed(lambda: F.linear(x, dense), iters=5) * 1e-3
            t_scaled += timed(scaled, iters=5) * 1e-3
            t_quant = timed(lambda: quantize_rows(x), iters=5) * 1e-3
            flops += 2 * rows * outs * inner
            print(f"prefill {rows} {name}: quantize_rows {t_quant * 1e6:.1f} us", flush=True)
        print(f"prefill rows {rows}: dense {flops / t_dense / 1e12:.0f} TFLOP/s ({t_dense * 1e6:.0f} us a layer), "
              f"scaled_mm {flops / t_scaled / 1e12:.0f} TFLOP/s ({t_scaled * 1e6:.0f} us)", flush=True)


if __name__ == "__main__":
    main()
