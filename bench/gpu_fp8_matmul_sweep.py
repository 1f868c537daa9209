"""GPU sweep: fp8 weight matmuls at decode batch sizes, llava-7b's projection shapes (for engine work).

python -m bench.gpu_fp8_matmul_sweep

For each (rows, out, in): dense fp16 ``F.linear``, ``torch._scaled_mm`` on per-row-quantized inputs (the prefill
path), and the weight-only kernel (kernels.fp8_weight_matmul) over its tile choices; microseconds and the
bandwidth over the weight bytes. Times are CUDA-graph replays (device time, no launch costs).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bench.gpu_engine_profile import graph_timed as timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import Fp8Weight, quantize_rows

#: llava-7b's projections, (out, in): the shapes every fp8 matmul probe here times.
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    best: dict = {}
    for name, (outs, inner) in SHAPES.items():
        dense = torch.randn(outs, inner, device=device, dtype=torch.float16) * 0.02
        quantized = Fp8Weight.quantize(dense)
        weight, scale = quantized.data.t(), quantized.scale[0]
        for rows in (1, 16, 32, 64):
            x = torch.randn(rows, inner, device=device, dtype=torch.float16)
            reference = F.linear(x, quantized.dequantize())
            t_dense = timed(lambda: F.linear(x, dense)) * 1e3

            def scaled() -> torch.Tensor:
                values, scales = quantize_rows(x)
                return torch._scaled_mm(values, quantized.data, scale_a=scales, scale_b=quantized.scale,
                                        out_dtype=torch.float16)
            t_scaled = timed(scaled) * 1e3
            results = []
            for block_n, block_k, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4)):
                try:
                    out = kernels.fp8_weight_matmul(x, weight, scale, block_n, block_k, warps, stages)
                    error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
                    us = timed(lambda: kernels.fp8_weight_matmul(x, weight, scale, block_n, block_k, warps, stages)) * 1e3
                except Exception as exc:
                    print(f"  {name} rows {rows} {block_n}/{block_k}/{warps}/{stages}: {type(exc).__name__}")
                    continue
                results.append((us, block_n, block_k, warps, stages, error))
            results.sort()
            us, block_n, block_k, warps, stages, error = results[0]
            nbytes = outs * inner
            print(f"{name:8s} rows {rows:2d}: dense {t_dense:6.1f} us ({2 * nbytes / t_dense / 1e6:.2f} TB/s), "
                  f"scaled_mm {t_scaled:6.1f} us, weight-only best {us:6.1f} us ({nbytes / us / 1e6:.2f} TB/s) "
                  f"at block_n {block_n} block_k {block_k} warps {warps} stages {stages} (rel err {error:.1e}); "
                  "next: " + ", ".join(f"{r[0]:.1f}@{r[1]}/{r[2]}/{r[3]}/{r[4]}" for r in results[1:4]), flush=True)
            best[(name, rows)] = results[0]


if __name__ == "__main__":
    main()
