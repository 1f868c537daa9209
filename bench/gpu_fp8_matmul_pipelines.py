"""GPU probe: pipeline depth of the fp8 x fp8 decode matmul, with plain and TMA loads (for engine work).

python -m bench.gpu_fp8_matmul_pipelines

llava-7b's projections at 32 and 64 rows: ``kernels.fp8_matmul`` at 64-channel tiles, 128- or 256-deep, 3-7
software-pipeline stages, against the same kernel loading both operands through TMA descriptors
(``triton.tools.tensor_descriptor``), and the engine's default tiles. Microseconds of CUDA-graph replays cycling
through enough weight copies to overflow the L2 cache.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.gpu_engine_profile import timed
from bench.gpu_fp8_matmul_sweep import SHAPES
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import Fp8Weight, quantize_rows

L2_OVERFLOW_BYTES = 256 << 20


@triton.jit
def _fp8_matmul_tma_kernel(x_desc, x_scale_ptr, w_desc, w_scale_ptr, out_ptr, m, n, k, ROWS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # kernels._fp8_matmul_kernel with TMA loads: out-of-bounds rows and columns come back as zeros.
    start_n = tl.program_id(0) * BLOCK_N
    acc = tl.zeros([BLOCK_N, ROWS], tl.float32)
    for start in range(0, k, BLOCK_K):
        acc += tl.dot(w_desc.load([start_n, start]), tl.trans(x_desc.load([0, start])))
    cols = start_n + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = acc * tl.load(w_scale_ptr + cols, mask=cols < n, other=0.0)[:, None]
    acc = acc * tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)[None, :]
    tl.store(out_ptr + rows[None, :] * n + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[None, :] < m) & (cols[:, None] < n))


def fp8_matmul_tma(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_n: int, block_k: int, num_warps: int, num_stages: int) -> torch.Tensor:
    rows, inner = x.shape
    outs = weight.shape[0]
    padded = max(16, triton.next_power_of_2(rows))
    out = torch.empty((rows, outs), dtype=torch.float16, device=x.device)
    _fp8_matmul_tma_kernel[(triton.cdiv(outs, block_n),)](
        TensorDescriptor.from_tensor(x, [padded, block_k]), x_scale,
        TensorDescriptor.from_tensor(weight, [block_n, block_k]), weight_scale, out, rows, outs, inner, ROWS=padded,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


def cycled(calls: list) -> float:  # type: ignore[type-arg]
    """Microseconds per call, the calls replayed in turn from one CUDA graph."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return timed(graph.replay, iters=10) / len(calls) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for name, (outs, inner) in SHAPES.items():
        copies = max(8, -(-L2_OVERFLOW_BYTES // (outs * inner)))
        weights = [Fp8Weight.quantize(torch.randn(outs, inner, device="cuda", dtype=torch.float16) * 0.02)
                   for _ in range(copies)]
        for rows in (64, 32):
            values, scales = quantize_rows(torch.randn(rows, inner, device="cuda", dtype=torch.float16))
            scales = scales[:, 0].contiguous()
            default = cycled([lambda w=w: kernels.fp8_matmul(values, scales, w.data.t(), w.scale[0], torch.float16)
                              for w in weights])
            cells = []
            for stages, block_k in itertools.product((3, 4, 5, 6, 7), (128, 256)):
                timings = []
                for matmul in (kernels.fp8_matmul, fp8_matmul_tma):
                    extra = (torch.float16,) if matmul is kernels.fp8_matmul else ()
                    try:
                        timings.append(cycled([
                            lambda w=w, f=matmul, e=extra: f(values, scales, w.data.t(), w.scale[0], *e, 64, block_k,
                                                             4, stages) for w in weights]))
                    except triton.runtime.errors.OutOfResources:
                        timings.append(float("nan"))
                cells.append(f"s{stages}/k{block_k}: {timings[0]:.1f} | {timings[1]:.1f}")
            print(f"{name} rows {rows}: default {default:.1f} us; (plain | tma) " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
