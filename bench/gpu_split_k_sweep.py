"""GPU sweep: the fp8 decode matmuls with their inner dimension split among programs (split-K), llava-7b's shapes.

python -m bench.gpu_split_k_sweep [--json OUT]

Few programs leave SMs idle: at 64 tiles of 64 channels, ``down`` and ``o`` run 64 programs on 132 SMs, and
``qkv``'s 192 run in one and a half waves. For the weight-only kernel at 1 row (batch-1 decode) and the fp8 x fp8
kernel at 64 rows (64 clients), each tile choice with 1-4 splits, against the default tiles. Microseconds of
CUDA-graph replays that cycle through enough weight copies to overflow the L2 cache, as a decode step's
32 layers do; bandwidth over the weight bytes. Each result is checked against the unsplit kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.gpu_engine_profile import timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import Fp8Weight, quantize_rows

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
WEIGHT_ONLY_TILES = list(itertools.product((32, 64), (256, 512), (4,), (3, 4), (1, 2, 3, 4)))
FP8_TILES = [t for t in itertools.product((64, 128), (128, 256), (4, 8), (3, 4), (1, 2, 3, 4))
             if not (t[0] == 64 and t[2] == 8)]
L2_OVERFLOW_BYTES = 256 << 20


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


def sweep(name: str, rows: int, weight_only: bool) -> dict:
    outs, inner = SHAPES[name]
    copies = max(8, -(-L2_OVERFLOW_BYTES // (outs * inner)))
    weights = [Fp8Weight.quantize(torch.randn(outs, inner, device="cuda", dtype=torch.float16) * 0.02)
               for _ in range(copies)]
    x = torch.randn(rows, inner, device="cuda", dtype=torch.float16)
    values, scales = quantize_rows(x)
    scales = scales[:, 0].contiguous()

    def call(weight: Fp8Weight, tile: tuple | None = None):  # type: ignore[no-untyped-def,type-arg]
        args = dict(zip(("block_n", "block_k", "num_warps", "num_stages", "split_k"), tile)) if tile else {}
        if weight_only:
            return lambda: kernels.fp8_weight_matmul(x, weight.data.t(), weight.scale[0], **args)
        return lambda: kernels.fp8_matmul(values, scales, weight.data.t(), weight.scale[0], torch.float16, **args)

    reference = call(weights[0])().float()
    default_us = cycled([call(w) for w in weights])
    results = []
    for tile in WEIGHT_ONLY_TILES if weight_only else FP8_TILES:
        try:
            first = call(weights[0], tile)().float()
            again = call(weights[0], tile)().float()
            us = cycled([call(w, tile) for w in weights])
        except Exception as exc:  # noqa: BLE001 - a tile past shared memory or registers is skipped
            print(f"  {name} rows {rows} {tile}: {type(exc).__name__}", flush=True)
            continue
        error = float((first - reference).abs().max() / reference.abs().max())
        results.append({"tile": list(tile), "us": us, "rel_err": error, "repeatable": bool(torch.equal(first, again))})
    results.sort(key=lambda r: r["us"])
    best = results[0]
    nbytes = outs * inner
    print(f"{name:8s} rows {rows:2d} ({'weight-only' if weight_only else 'fp8 x fp8'}, {copies} weight copies): "
          f"default {default_us:6.1f} us ({nbytes / default_us / 1e6:.2f} TB/s), best {best['us']:6.1f} us "
          f"({nbytes / best['us'] / 1e6:.2f} TB/s) at {'/'.join(map(str, best['tile']))} "
          f"(n/k/warps/stages/splits, rel err {best['rel_err']:.1e}, repeatable {best['repeatable']}); next: "
          + ", ".join(f"{r['us']:.1f}@{'/'.join(map(str, r['tile']))}" for r in results[1:5]), flush=True)
    unsplit = [r for r in results if r["tile"][-1] == 1]
    if unsplit:
        print(f"{'':8s} best unsplit {unsplit[0]['us']:6.1f} us at {'/'.join(map(str, unsplit[0]['tile']))}",
              flush=True)
    return {"shape": name, "rows": rows, "default_us": default_us, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--kinds", default="weight_only,fp8", help="weight_only (1 row), fp8 (64 rows)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    report = []
    for kind in args.kinds.split(","):
        for name in args.shapes.split(","):
            report.append(sweep(name, 1 if kind == "weight_only" else 64, kind == "weight_only"))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sweeps": report}, f)
    for kind in args.kinds.split(","):
        sweeps = [s for s in report if (s["rows"] == 1) == (kind == "weight_only")]
        print(f"per layer, {kind}: default {sum(s['default_us'] for s in sweeps):.1f} us, "
              f"best {sum(s['results'][0]['us'] for s in sweeps):.1f} us", flush=True)


if __name__ == "__main__":
    main()
