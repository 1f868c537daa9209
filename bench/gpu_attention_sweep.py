"""GPU sweep: the decode attention kernel's tile sizes, per KV dtype, at llava's c64 shape (for engine work).

python -m bench.gpu_attention_sweep [--batch 64] [--context 660] [--dim 128] [--positions 769]

Times the split kernel (plus the merge) for each (positions per split, positions per loop, warps, stages) and
prints the effective bandwidth over the K/V bytes the rows own.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.gpu_engine_profile import graph_timed as timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import FP8


def attention(q, keys, values, lengths, split: int, block: int, warps: int, stages: int) -> torch.Tensor:
    return kernels.decode_attention(q, keys, values, lengths, kernels.AttentionTiles(split, block, warps, stages))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=660)
    parser.add_argument("--dim", type=int, default=128, help="head_dim (kosmos2, moondream2: 64)")
    parser.add_argument("--positions", type=int, default=769, help="cache positions per slot")
    parser.add_argument("--splits", default="64,128,256", help="positions per split to try")
    parser.add_argument("--blocks", default="32,64,128", help="positions per loop iteration to try")
    args = parser.parse_args()
    device = torch.device("cuda")
    heads, dim, positions = 32, args.dim, args.positions
    q = torch.randn(args.batch, heads, dim, device=device, dtype=torch.float16)
    lengths = torch.full((args.batch,), args.context, device=device)
    for dtype in (torch.float16, FP8):
        keys = torch.randn(args.batch, heads, positions, dim, device=device, dtype=torch.float16).to(dtype)
        values = torch.randn(args.batch, heads, positions, dim, device=device, dtype=torch.float16).to(dtype)
        moved = 2 * args.batch * heads * args.context * dim * keys.element_size()
        reference = kernels.decode_attention(q, keys, values, lengths)
        results = []
        for split, block, warps, stages in itertools.product(
                [int(v) for v in args.splits.split(",")], [int(v) for v in args.blocks.split(",")], (2, 4, 8), (2, 3)):
            if block > split:
                continue
            try:
                out = attention(q, keys, values, lengths, split, block, warps, stages)
                error = float((out.float() - reference.float()).abs().max())
                us = timed(lambda: attention(q, keys, values, lengths, split, block, warps, stages)) * 1e3
            except Exception as exc:  # out of shared memory and the like
                print(f"{dtype} split {split} block {block} warps {warps} stages {stages}: {type(exc).__name__}")
                continue
            results.append((us, split, block, warps, stages, error))
        results.sort()
        current = timed(lambda: kernels.decode_attention(q, keys, values, lengths)) * 1e3
        tiles = kernels.attention_tiles(args.batch, heads)
        print(f"{dtype}: current (split {tiles.split}, block {tiles.block}, {tiles.warps} warps) "
              f"{current:.1f} us = {moved / current / 1e6:.2f} TB/s", flush=True)
        for us, split, block, warps, stages, error in results[:8]:
            print(f"  split {split:3d} block {block:3d} warps {warps} stages {stages}: {us:6.1f} us "
                  f"{moved / us / 1e6:.2f} TB/s (max diff {error:.1e})", flush=True)


if __name__ == "__main__":
    main()
