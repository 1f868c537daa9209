"""How close llava-1.5-7b at 64 clients comes to what one GPU allows, beside HF generate, in one process.

python -m triton_vlm.bench.gpu_roofline [--quantization fp8 --kv-cache-dtype fp8] [--requests 192] [--json OUT]

1. Peaks measured here, the best of several shapes (generous, so the floor is low): memory bandwidth (a copy,
   bytes read + written, and a reduction, bytes read) and matmul rates at llava's projection shapes, 8192 rows,
   float16 (``torch.mm``) and fp8 (``torch._scaled_mm`` with per-row and per-channel scales, as the engine).
2. HF ``generate`` at batch 64, its first call and a repeat (PyTorch's default SDPA backends, as the served
   benchmark's baseline), before the engine exists (it turns cuDNN's SDPA off for the process).
3. The engine in-process at 64 clients (``--requests``, 128 tokens each), device time by phase.
4. The floor of that run from :mod:`triton_vlm.bench.roofline` at the measured peaks (and at the datasheet's, on
   an H100 SXM), phase by phase beside the engine's device time, and what 6x HF's repeat would take as a share of
   the floor.

Recorded runs: bench/results/h100-llava-roofline-fp8.json and h100-llava-roofline-fp16.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from typing import Any

import torch

from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.bench.inprocess import NEW_TOKENS, GpuTimeline, engine_run, hf_generate, probe_inputs
from triton_vlm.bench.roofline import Peaks, WaveCost, llava_wave_cost, wave_floor
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family

CLIENTS = 64
#: NVIDIA H100 SXM5 80GB datasheet: HBM3 bandwidth, dense fp8 and fp16 tensor-core rates (no sparsity).
H100_SXM_DATASHEET = Peaks(bandwidth_b_s=3.35e12, prefill_flop_s=1979e12, vision_flop_s=989e12)
#: llava's decoder projections as (in, out): q/k/v fused, o, gate/up fused, down.
PROJECTIONS = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))


def best_seconds(fn: Callable[[], object], repeats: int = 10) -> float:
    """The fastest of ``repeats`` timed calls (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def bandwidth(device: torch.device, gib: float = 4.0) -> dict[str, float]:
    """Bytes/s of a device-to-device copy (read + written) and of a sum (read)."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    size = src.numel() * src.element_size()
    copy = 2 * size / best_seconds(lambda: dst.copy_(src))
    read = size / best_seconds(lambda: src.sum(dtype=torch.float32))
    return {"copy_b_s": copy, "sum_b_s": read}


def matmul_rates(device: torch.device, rows: int = 8192) -> dict[str, dict[str, float]]:
    """FLOP/s of float16 and fp8 matmuls at llava's projection shapes; the best of each."""
    fp8 = torch.float8_e4m3fn
    rates: dict[str, dict[str, float]] = {"fp16": {}, "fp8": {}}
    for k, n in PROJECTIONS:
        a = torch.randn(rows, k, device=device, dtype=torch.float16)
        w = torch.randn(n, k, device=device, dtype=torch.float16)
        flops = 2 * rows * k * n
        # partial, not a lambda: each timed call binds this iteration's tensors.
        rates["fp16"][f"{k}x{n}"] = flops / best_seconds(functools.partial(torch.matmul, a, w.t()))
        a8, w8 = a.to(fp8), w.to(fp8).t()  # [k, n] column-major, as Fp8Weight keeps it
        scale_a = torch.ones(rows, 1, device=device)
        scale_b = torch.ones(1, n, device=device)
        rates["fp8"][f"{k}x{n}"] = flops / best_seconds(
            functools.partial(torch._scaled_mm, a8, w8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float16))
    return rates


def main() -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="fp8", choices=["none", "fp8"])
    parser.add_argument("--kv-cache-dtype", default="fp8", choices=["auto", "fp8"])
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "clients": CLIENTS,
        "requests": args.requests, "output_tokens": NEW_TOKENS, "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype}
    result["bandwidth"] = bandwidth(device)
    result["matmul_flop_s"] = matmul_rates(device)
    torch.cuda.empty_cache()  # the probes' buffers, before the model
    print(json.dumps({k: result[k] for k in ("bandwidth", "matmul_flop_s")}, indent=1), flush=True)
    fp8_weights = args.quantization == "fp8"
    measured = Peaks(bandwidth_b_s=max(result["bandwidth"].values()),
                     prefill_flop_s=max(result["matmul_flop_s"]["fp8" if fp8_weights else "fp16"].values()),
                     vision_flop_s=max(result["matmul_flop_s"]["fp16"].values()))

    family = get_family("llava")
    torch.manual_seed(0)
    model, processor = random_llava_7b(device)
    images, prompts = probe_inputs()
    prompt_tokens = len(processor(images=images[:1], text=[family.render_prompt(processor, prompts[0])],
                                  return_tensors="pt")["input_ids"][0])
    batch = [images[i % len(images)] for i in range(CLIENTS)]
    hf_generate(model, processor, family, batch[:2], prompts[:2])  # CUDA libraries' one-time set-up
    # The first batch-64 call pays cuDNN's SDPA plans for each new sequence length (the served benchmark's
    # baseline, as here); a repeat at the same shapes finds them built. The 6x below is against the repeat.
    for name in ("hf_c64_tok_s", "hf_c64_repeated_tok_s"):
        seconds, _ = hf_generate(model, processor, family, batch, [prompts[0]] * CLIENTS)
        result[name] = CLIENTS * NEW_TOKENS / seconds
    print(f"HF generate batch {CLIENTS}: first call {result['hf_c64_tok_s']:.0f} tok/s, repeated "
          f"{result['hf_c64_repeated_tok_s']:.0f} tok/s", flush=True)

    config = EngineConfig(max_model_len=768, max_num_seqs=CLIENTS, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype)
    engine = LLMEngine(family, model, processor, config)
    engine.runner.warmup()
    engine.start()
    engine_run(engine, images, prompts, CLIENTS, CLIENTS)  # warm-up
    timeline = GpuTimeline(engine.runner)
    run = engine_run(engine, images, prompts, CLIENTS, args.requests)
    busy, span = timeline.busy_seconds()
    engine.shutdown()
    result.update(engine_c64_tok_s=run["output_tok_s"], engine_seconds=run["seconds"], engine_device_span_s=span,
                  engine_device_s=busy, prompt_tokens=prompt_tokens)

    cost = llava_wave_cost(model.config, prompt_tokens, NEW_TOKENS, weight_bytes=1.0 if fp8_weights else 2.0,
                           kv_bytes=1.0 if args.kv_cache_dtype == "fp8" else 2.0)
    add_floors(result, cost, measured)
    print(table(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def add_floors(result: dict[str, Any], cost: WaveCost, measured: Peaks) -> None:
    """Put the run's floors into ``result`` (which holds the run's measurements: ``requests``, ``gpu``,
    ``engine_c64_tok_s``, ``hf_c64_tok_s``, ``hf_c64_repeated_tok_s``): per wave and for the whole run, at the
    ``measured`` peaks and, on an H100 SXM, at the datasheet's; the engine's and 6x HF's share of each."""
    engine_tok_s = result["engine_c64_tok_s"]
    waves = result["requests"] / CLIENTS
    result["engine_over_hf"] = engine_tok_s / result["hf_c64_tok_s"]
    result["engine_over_hf_repeated"] = engine_tok_s / result["hf_c64_repeated_tok_s"]
    target = 6 * result["hf_c64_repeated_tok_s"]
    result["six_x_hf_repeated_tok_s"] = target
    floors = {"measured_peaks": measured}
    if "H100" in result["gpu"] and "HBM3" in result["gpu"]:
        floors["h100_sxm_datasheet"] = H100_SXM_DATASHEET
    result["floors"] = {}
    for name, peaks in floors.items():
        floor = wave_floor(cost, peaks, CLIENTS)
        result["floors"][name] = {
            "peaks": peaks.__dict__, "wave": floor.as_json(NEW_TOKENS),
            "run_floor_s": {"vision": floor.vision_s * waves, "prefill": floor.prefill_s * waves,
                            "decode": floor.decode_s * waves, "serial": floor.serial_s * waves},
            "engine_share_of_serial_floor": engine_tok_s / floor.tok_s(NEW_TOKENS),
            "six_x_hf_repeated_share_of_serial_floor": target / floor.tok_s(NEW_TOKENS),
            "six_x_hf_repeated_share_of_overlapped_floor": target / floor.tok_s(NEW_TOKENS, overlapped=True),
        }


def table(result: dict[str, Any]) -> str:
    """The run beside its floor, phase by phase, as printed (``result`` after :func:`add_floors`)."""
    measured = result["floors"]["measured_peaks"]
    engine = result["engine_device_s"]
    phases: list[tuple[str, tuple[str, ...]]] = [("vision", ("build_prompt_embeds",)), ("prefill", ("prefill",)), ("decode", ("decode",))]
    if engine.get("prefill_and_decode"):  # steps that prefill and decode in one forward: the two together
        phases[1:] = [("prefill+decode", ("prefill", "decode", "prefill_and_decode"))]
    lines = [f"llava-1.5-7b, {result['clients']} clients, {result['requests']} requests x {result['output_tokens']} "
             f"tokens, prompt {result['prompt_tokens']} positions, quantization {result['quantization']}, "
             f"KV {result['kv_cache_dtype']} ({result['gpu']})",
             f"{'phase':<15}{'engine device s':>18}{'floor s (measured peaks)':>28}{'floor / engine':>16}"]
    for name, keys in phases:
        spent = sum(engine.get(k, 0.0) for k in keys)
        floor = sum(measured["run_floor_s"][part] for part in name.split("+"))
        lines.append(f"{name:<15}{spent:>18.3f}{floor:>28.3f}{floor / spent if spent else 0.0:>16.2f}")
    lines.append(f"{'run (wall)':<15}{result['engine_seconds']:>18.3f}{measured['run_floor_s']['serial']:>28.3f}"
                 f"{measured['run_floor_s']['serial'] / result['engine_seconds']:>16.2f}")
    for name, entry in result["floors"].items():
        wave = entry["wave"]
        lines.append(f"floor at {name}: serial {wave['serial_tok_s']:.0f} tok/s, overlapped "
                     f"{wave['overlapped_tok_s']:.0f} tok/s; engine {result['engine_c64_tok_s']:.0f} "
                     f"({entry['engine_share_of_serial_floor']:.0%} of serial); 6x HF repeated "
                     f"({result['hf_c64_repeated_tok_s']:.0f}) = {result['six_x_hf_repeated_tok_s']:.0f} tok/s = "
                     f"{entry['six_x_hf_repeated_share_of_serial_floor']:.0%} of serial, "
                     f"{entry['six_x_hf_repeated_share_of_overlapped_floor']:.0%} of overlapped")
    lines.append(f"engine / HF at batch {result['clients']}: {result['engine_over_hf']:.1f}x the first call "
                 f"({result['hf_c64_tok_s']:.0f} tok/s), {result['engine_over_hf_repeated']:.1f}x the repeat")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
