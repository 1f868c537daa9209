"""Kernel-level look at llava's vision batch and at chunked prefill steps (H100 probe, random fp16 weights)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family


def table(fn, rows: int = 12) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def main() -> None:
    sdpa_first_call()  # before the engine exists: it turns cuDNN's SDPA off for the process
    model, processor = random_llava_7b(torch.device("cuda"))
    print("attn impl: vision", model.config.vision_config._attn_implementation, "text",
          model.config.text_config._attn_implementation, flush=True)
    engine = LLMEngine(get_family("llava"), model, processor, EngineConfig(max_model_len=768, max_num_seqs=64))
    engine.runner.warmup()
    c64_trace(engine)


def sdpa_first_call() -> None:
    """First-call cost of causal SDPA at a new query length, per backend (cuDNN builds a plan per shape)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(backends: list | None, q: torch.Tensor) -> float:
        """Seconds for one causal call under ``backends`` (None: PyTorch's own choice)."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        with contextlib.nullcontext() if backends is None else sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for offset, (name, backends) in enumerate((("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
                                               ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                                               ("efficient", [SDPBackend.EFFICIENT_ATTENTION]))):
        firsts, warm = [], 0.0
        for length in (601, 613, 627, 641):  # lengths no other backend saw: each pays its first-call cost
            q = torch.randn(1, 32, length + 1000 * offset, 128, device="cuda", dtype=torch.float16)
            firsts.append(attend(backends, q) * 1e3)
            warm = attend(backends, q) * 1e3
        print(f"sdpa {name}: first calls at new lengths " + ", ".join(f"{f:.1f}" for f in firsts)
              + f" ms; warm {warm:.2f} ms", flush=True)


def gaps(trace_path: str, top: int = 15) -> None:
    """Where the device idles: the union of kernel intervals in a Chrome trace vs its span, and the widest gaps."""
    import json

    events = json.load(open(trace_path))["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    busy, end, widest = 0.0, kernels[0][0], []
    previous = ""
    for start, stop, name in kernels:
        if start > end:
            widest.append((start - end, previous[:60], name[:60]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        previous = name
    span = end - kernels[0][0]
    total_gap = sum(g for g, _, _ in widest)
    print(f"trace: span {span / 1e3:.0f} ms, kernels busy {busy / 1e3:.0f} ms, idle {total_gap / 1e3:.0f} ms "
          f"in {len(widest)} gaps ({sum(g for g, _, _ in widest if g > 100) / 1e3:.0f} ms in gaps > 100 us)", flush=True)
    by_kind: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in widest:
        if gap > 100:
            by_kind.setdefault((before[:40], after[:40]), []).append(gap)
    for (before, after), values in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(values) / 1e3:7.1f} ms in {len(values):4d} gaps  after {before!r} before {after!r}", flush=True)


def c64_trace(engine) -> None:
    import numpy as np
    from PIL import Image

    from bench.gpu_engine_probe import engine_run
    from bench.gpu_engine_profile import GpuTimeline

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(64)]
    prompts = ["Describe this image in detail, including the colors, objects and their positions."] * 64
    engine.start()
    timeline = GpuTimeline(engine.runner)
    ttfts = []
    for i in range(8):
        result = engine_run(engine, images[i:], prompts, 1, 1)
        ttfts.append(result["ttft_p50_s"] * 1e3)
    print("c1 ttft ms: " + ", ".join(f"{t:.1f}" for t in ttfts), "|", timeline.report(1.0), flush=True)
    images = images * 3
    for attempt in ("cold", "warm"):
        result = engine_run(engine, images, prompts * 3, 64, 192)
        print(f"c64 x 192 ({attempt}): {result['output_tok_s']:.0f} tok/s;", timeline.report(result["seconds"]),
              flush=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        result = engine_run(engine, images[:64], prompts, 64, 64)
    print(f"profiled c64 x 64 requests: {result['output_tok_s']:.0f} tok/s", flush=True)
    prof.export_chrome_trace("/tmp/c64.json")
    gaps("/tmp/c64.json")


if __name__ == "__main__":
    main()
