"""GPU probe: fp8 projection inputs made by the kernel before the projection, or by a quantizing pass of their own.

python -m bench.gpu_fp8_producers [--json OUT]

llava-7b's shapes (hidden 4096, MLP 11008), float16, per decoder layer, microseconds of CUDA-graph replays:
- ``separate``: the plain RMSNorm (twice a layer) and SiLU-gating kernels, then ``quantize_rows`` of each output;
- ``fused``: ``add_rms_norm_fp8`` and ``silu_mul_fp8``, which emit the per-row fp8 values and scales themselves.
Both give the same values but for a few one-step fp8 roundings (on an H200: 4-36 of 2.6-17 million norm outputs,
none of the gating's): the two RMSNorm kernels compile apart and can round the float16 output an ulp apart.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.gpu_engine_profile import graph_timed
from triton_vlm.engine import kernels
from triton_vlm.engine.quantization import FP8, FP8_MAX, quantize_rows

HIDDEN, MLP = 4096, 11008


def layer_inputs(rows: int, fused: bool, x, residual, weight, gate_up):  # type: ignore[no-untyped-def]
    """The three quantized projection inputs of one layer (qkv's, gate_up's, down's)."""
    outs = []
    for _ in range(2):
        if fused:
            outs.append(kernels.add_rms_norm_fp8(x, residual, weight, 1e-6, FP8, FP8_MAX))
        else:
            outs.append(quantize_rows(kernels.add_rms_norm(x, residual, weight, 1e-6)))
    outs.append(kernels.silu_mul_fp8(gate_up, FP8, FP8_MAX) if fused else quantize_rows(kernels.silu_mul(gate_up)))
    return outs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="17,32,64,628,4096")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    print(f"{'rows':>6} {'separate us':>12} {'fused us':>10} {'ratio':>6}  same bits", flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(rows)
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.float16, generator=gen)
        residual = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.float16, generator=gen)
        weight = torch.randn(HIDDEN, device="cuda", dtype=torch.float16, generator=gen) + 1
        gate_up = torch.randn(rows, 2 * MLP, device="cuda", dtype=torch.float16, generator=gen)
        # Both from the same residual: the norm adds x into it in place.
        start = residual.clone()
        separate = layer_inputs(rows, False, x, residual, weight, gate_up)
        residual.copy_(start)
        fused = layer_inputs(rows, True, x, residual, weight, gate_up)
        same = all(torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
                   for a, b in zip(separate, fused))
        if not same:
            for name, a, b in zip(("input norm", "post norm", "gating"), separate, fused):
                differ = a[0].view(torch.uint8) != b[0].view(torch.uint8)
                worst = (a[0].float() - b[0].float()).abs().max().item()
                print(f"  {name}: {int(differ.sum())} of {differ.numel()} values differ (largest by {worst}), "
                      f"scales differ in {int((a[1] != b[1]).sum())} rows; e.g. {a[0][differ][:4].float().tolist()} "
                      f"vs {b[0][differ][:4].float().tolist()}", flush=True)
        times = {name: graph_timed(lambda f=flag: layer_inputs(rows, f, x, residual, weight, gate_up)) * 1e3
                 for name, flag in (("separate", False), ("fused", True))}
        print(f"{rows:>6} {times['separate']:>12.1f} {times['fused']:>10.1f} "
              f"{times['separate'] / times['fused']:>6.2f}  {same}", flush=True)
        results["rows"].append({"rows": rows, "separate_us": times["separate"], "fused_us": times["fused"],
                                "same_bits": same})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
