"""GPU probe: other ways to run llava-7b's fp8 projections at decode and prefill sizes (for engine work).

python -m bench.gpu_fp8_gemm_variants

Decode rows (1..64), per projection, microseconds of CUDA-graph replays:
- ``engine``: what ``quantization.linear`` does at that size.
- ``scaled``: inputs quantized per row, ``torch._scaled_mm(x, W^T)`` (the engine's path before the fp8 kernel).
- ``swap``: the same product transposed, ``_scaled_mm(W, x^T)`` then back to [rows, out]: the weight's output
  channels fill the tensor cores' wide M side, the few rows the narrow N side.
- ``wo``: the engine's weight-only kernel (kernels.fp8_weight_matmul), at its default tiles.
- ``w8a8_swap``: kernels.fp8_matmul (fp8 x fp8, the weight's channels on the wide side) at the best of a few
  tiles, input quantization included. (The recorded run also timed a weight-only kernel in that orientation,
  ``wo_swap``: slower than ``wo`` or ``w8a8_swap`` at every size, so it was dropped.)
Prefill rows (628, 4096): dense fp16 against ``scaled``, in TFLOP/s.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton

from bench.gpu_engine_profile import graph_timed as timed
from bench.gpu_fp8_matmul_sweep import SHAPES
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import Fp8Weight, linear, quantize_rows


def best_fp8_kernel(values, scales, weight, wscale, reference):  # type: ignore[no-untyped-def]
    """kernels.fp8_matmul at the best of a few tiles: (microseconds, tiles, relative error)."""
    results = []
    for block_n, block_k, warps, stages in itertools.product((64, 128), (128, 256), (4, 8), (3, 4)):
        def run() -> torch.Tensor:
            return kernels.fp8_matmul(values, scales, weight, wscale, torch.float16, block_n, block_k, warps, stages)
        try:
            out = run()
            error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
            us = timed(run) * 1e3
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
            values, scales = quantize_rows(x)
            us, tile, error = best_fp8_kernel(values, scales[:, 0].contiguous(), weight_rows, wscale, reference)
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
