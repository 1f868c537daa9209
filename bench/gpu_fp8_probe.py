"""GPU probe for the engine's fp8 options: kernel checks against the torch twins, then llava-1.5-7b (random fp16
weights) in-process at b1 and c64 for each of fp16, fp8 KV cache, fp8 weights, and both.

python -m bench.gpu_fp8_probe --json OUT.json [--variants none/auto,none/fp8,fp8/auto,fp8/fp8,fp8/fp8/8192]

A variant is ``quantization/kv_cache_dtype[/max_prefill_tokens[/option...]]``; options: the variants of
bench/gpu_ablation_probe.py (e.g. "split_256_attention_tiles"), "separate" (prompt chunks
and decode rows in their own forwards, not one), "quantizing_passes" (fp8 projections quantize their inputs in
passes of their own, not in the RMSNorm and SiLU-gating kernels). Every variant builds the same (seeded) random
weights; greedy tokens are compared with the fp16 engine's (random weights have near-ties, so a shared prefix,
not equality, is what to expect). The c64 run reports device time by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch
import torch.nn.functional as F

from bench.gpu_ablation_probe import VARIANTS as ABLATIONS
from bench.gpu_engine_probe import engine_run, probe_inputs
from bench.gpu_engine_profile import GpuTimeline
from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.engine import EngineConfig, LLMEngine, kernels
from triton_vlm.engine.quantization import (FP8, FP8_MAX, WEIGHT_ONLY_MAX_ROWS, Fp8Weight, linear, quantize_rows,
                                            to_storage)
from triton_vlm.models import get_family


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def kernel_checks() -> dict:
    """The fused kernels against their torch twins, on the device (llava's shapes)."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    checks: dict = {}
    x = torch.randn(64, 4096, device=device, dtype=torch.float16) * 3
    values, scales = kernels.quantize_rows_fp8(x, FP8, FP8_MAX)
    rows = x.float()
    twin_scales = rows.abs().amax(dim=1, keepdim=True) / FP8_MAX
    twin = (rows / twin_scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    checks["quantize_rows_scale_max_rel_diff"] = float(((scales - twin_scales).abs() / twin_scales).max())
    checks["quantize_rows_values_differ"] = int((values.float() != twin.float()).sum())
    weight = torch.randn(12288, 4096, device=device, dtype=torch.float16) * 0.02
    quantized = Fp8Weight.quantize(weight)
    for m in (1, 7, 16, 17, 33, 64, 65, 4096):
        a = torch.randn(m, 4096, device=device, dtype=torch.float16)
        out = linear(a, quantized)
        if m <= WEIGHT_ONLY_MAX_ROWS:  # the weight-only kernel against its twin
            twin = F.linear(a, quantized.dequantize())
        else:
            q, s = quantize_rows(a)
            twin = (q.float() * s) @ (quantized.data.float() * quantized.scale)
        checks[f"fp8_linear_m{m}_vs_twin_rel"] = relative_error(out, twin)
        checks[f"fp8_linear_m{m}_vs_fp16_rel"] = relative_error(out, F.linear(a, weight))
    for dtype in (torch.float16, FP8):
        keys = torch.zeros(8, 32, 769, 128, device=device, dtype=dtype)
        values_cache = torch.zeros_like(keys)
        k, v = torch.randn(2, 8, 32, 128, device=device, dtype=torch.float16).unbind(0)
        k[0, 0, 0] = 1000.0  # saturates in fp8
        positions = torch.tensor([5, 768, 0, 3, 3, 100, 200, 767], device=device)
        twin_keys, twin_values = keys.clone(), values_cache.clone()
        slots = torch.arange(8, device=device)
        twin_keys[slots, :, positions] = to_storage(k, dtype)
        twin_values[slots, :, positions] = to_storage(v, dtype)
        assert kernels.store_kv(k, v, keys, values_cache, slots, positions, FP8_MAX)
        name = "fp8" if dtype == FP8 else "fp16"
        checks[f"store_kv_{name}_equal"] = bool(torch.equal(keys.float(), twin_keys.float())
                                                and torch.equal(values_cache.float(), twin_values.float()))
        lengths = torch.tensor([6, 769, 1, 4, 4, 101, 201, 768], device=device)
        for cache in (keys, values_cache):
            cache.copy_(torch.randn(keys.shape, device=device, dtype=torch.float16).to(dtype))
        q = torch.randn(8, 32, 128, device=device, dtype=torch.float16)
        fused = kernels.decode_attention(q, keys, values_cache, lengths)
        reference = kernels.decode_attention_torch(q, keys, values_cache, lengths)
        checks[f"decode_attention_{name}_vs_torch_rel"] = relative_error(fused, reference)
    checks.update(prefill_checks(device))
    x = torch.randn(3768, 32, 128, device=device, dtype=torch.float16)
    cos, sin = torch.randn(2, 3768, 1, 128, device=device, dtype=torch.float16).unbind(0)
    checks["rope_vs_torch_max_diff"] = float((kernels.rope(x, cos, sin) - kernels.rope_torch(x, cos, sin)).abs().max())
    return checks


def prefill_checks(device: torch.device) -> dict:
    """Prefill attention with one variable-length flash call a layer against the per-chunk SDPA path: fresh
    chunks, then a step mixing a continued chunk (its prefix from the cache) with fresh ones; fp16 and fp8 K/V."""
    from triton_vlm.engine.attention import causal_chunk_masks, prefill_attention
    from triton_vlm.engine.kv_cache import SlotKVCache

    checks = {}
    for name, dtype in (("fp16", torch.float16), ("fp8", FP8)):
        caches = [SlotKVCache(1, 4, 8, 128, 800, dtype, device) for _ in range(2)]
        for step, chunks in enumerate(([(0, 0, 300), (1, 0, 628)], [(0, 300, 328), (2, 0, 628), (3, 0, 17)])):
            tokens = sum(n for _, _, n in chunks)
            q, k, v = (torch.randn(tokens, 8, 128, device=device, dtype=torch.float16) for _ in range(3))
            outs = []
            for cache, fused in zip(caches, (True, False)):
                masks = causal_chunk_masks(chunks, device)
                attend = prefill_attention(cache, chunks, masks, gqa=False, fused=fused, causal=True)
                outs.append(attend(0, q, k, v))
            checks[f"prefill_varlen_vs_sdpa_{name}_step{step}_rel"] = relative_error(outs[0], outs[1])
    return checks


def variant_run(variant: str, images: list, prompts: list, reference: list[int] | None) -> dict:
    options = variant.split("/")[3:]
    with contextlib.ExitStack() as stack:
        for option in options:
            if option in ABLATIONS:
                stack.enter_context(ABLATIONS[option]())
        return _variant_run(variant, images, prompts, reference)


def _variant_run(variant: str, images: list, prompts: list, reference: list[int] | None) -> dict:
    quantization, kv, *options = variant.split("/")
    family = get_family("llava")
    torch.manual_seed(0)
    model, processor = random_llava_7b(torch.device("cuda"))
    config = EngineConfig(max_model_len=768, max_num_seqs=64, quantization=quantization, kv_cache_dtype=kv,
                          max_prefill_tokens=int(options[0]) if options else EngineConfig.max_prefill_tokens)
    engine = LLMEngine(family, model, processor, config)
    if "separate" in options[1:]:  # prompt chunks and decode rows in their own forwards, as before mixing
        engine.runner.mixes = False
    if "quantizing_passes" in options[1:]:  # fp8 inputs quantized by passes of their own, as before the fusion
        engine.decoder.fp8_inputs_from_producers = False
    engine.runner.warmup()
    engine.start()
    # Weights, KV cache and decode graphs: what the engine holds once built.
    result: dict = {"variant": variant, "allocated_gib": torch.cuda.memory_allocated() / 2**30}
    engine_run(engine, images, prompts, 1, 2)  # warm-up
    b1 = engine_run(engine, images, prompts, 1, 3)
    result.update(b1_tok_s=b1["output_tok_s"], ttft_b1_s=b1["ttft_p50_s"])
    tokens = b1["outputs"]["r0"]
    if reference is not None:
        result["greedy_prefix_matching_fp16"] = next(
            (i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
    engine_run(engine, images, prompts, 64, 64)  # warm-up
    timeline = GpuTimeline(engine.runner)
    c64 = engine_run(engine, images, prompts, 64, 192)
    result.update(c64_tok_s=c64["output_tok_s"], c64_ttft_p50_s=c64["ttft_p50_s"], c64_seconds=c64["seconds"],
                  c64_device_time=timeline.report(c64["seconds"]))
    result["tokens_r0"] = tokens
    print(json.dumps({k: v for k, v in result.items() if k != "tokens_r0"}), flush=True)
    engine.shutdown()
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--variants", default="none/auto,none/fp8,fp8/auto,fp8/fp8,fp8/fp8/8192")
    args = parser.parse_args()
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    results["kernel_checks"] = kernel_checks()
    print(json.dumps(results["kernel_checks"], indent=1), flush=True)
    images, prompts = probe_inputs()
    runs = []
    reference = None
    for variant in args.variants.split(","):
        t = time.perf_counter()
        run = variant_run(variant, images, prompts, reference)
        run["probe_seconds"] = time.perf_counter() - t
        if reference is None and variant == "none/auto":
            reference = run["tokens_r0"]
        runs.append(run)
    results["runs"] = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
