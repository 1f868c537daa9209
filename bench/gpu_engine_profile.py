"""Where does an engine step spend its time on the GPU? (llava-1.5-7b architecture, random fp16 weights)"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family


def graph_timed(fn, iters: int = 20) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph: device time without the host's launch costs
    (which exceed a small kernel's own time when launched one by one from Python)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return timed(graph.replay, iters=5) / iters


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_decode_attention() -> None:
    """Decode attention at c64 shapes (llava-7b: 32 heads of 128, a 768-position cache), fused vs masked SDPA."""
    from triton_vlm.engine import kernels

    q = torch.randn(64, 32, 128, device="cuda", dtype=torch.float16)
    keys = torch.randn(64, 32, 769, 128, device="cuda", dtype=torch.float16)
    values = torch.randn(64, 32, 769, 128, device="cuda", dtype=torch.float16)
    lengths = torch.randint(596, 725, (64,), device="cuda")
    got, ref = kernels.decode_attention(q, keys, values, lengths), kernels.decode_attention_torch(q, keys, values, lengths)
    fused_ms = timed(lambda: kernels.decode_attention(q, keys, values, lengths))
    sdpa_ms = timed(lambda: kernels.decode_attention_torch(q, keys, values, lengths, 768))
    print(f"decode_attention max err {(got - ref).abs().max().item():.2e}; b64 one layer: fused {fused_ms * 1e3:.0f} us, "
          f"masked SDPA over 768 {sdpa_ms * 1e3:.0f} us", flush=True)


class GpuTimeline:
    """CUDA events around the runner's phases: device time per phase, and the device idle between them."""

    def __init__(self, runner) -> None:
        self.marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        for phase in ("build_prompt_embeds", "prefill", "decode", "prefill_and_decode"):
            setattr(runner, phase, self._wrap(phase, getattr(runner, phase)))

    def _wrap(self, phase: str, fn):
        def timed_call(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args, **kwargs)
            end.record()
            self.marks.append((phase, start, end))
            return result
        return timed_call

    def busy_seconds(self) -> tuple[dict[str, float], float]:
        """Device seconds by phase since the last call, and the span from the first phase's start to the last's
        end; forgets the marks."""
        torch.cuda.synchronize()
        busy: dict[str, float] = {}
        for phase, start, end in self.marks:
            busy[phase] = busy.get(phase, 0.0) + start.elapsed_time(end) / 1e3
        span = self.marks[0][1].elapsed_time(self.marks[-1][2]) / 1e3 if self.marks else 0.0
        self.marks.clear()
        return busy, span

    def report(self, wall_s: float) -> str:
        counts = Counter(phase for phase, _start, _end in self.marks)
        busy, span = self.busy_seconds()
        idle = span - sum(busy.values())
        return (f"gpu span {span:.2f}s of wall {wall_s:.2f}s; " + ", ".join(
            f"{p} {busy[p]:.2f}s/{counts[p]} calls" for p in busy) + f"; between phases {idle:.2f}s")


def check_prefill(engine) -> None:
    """Prefill throughput: one 4096-token step of packed 628-token prompts (TFLOP/s of the language model)."""
    from triton_vlm.engine.request import EngineRequest, Sequence
    from triton_vlm.engine.scheduler import PrefillChunk
    from triton_vlm.sampling import SamplingParams

    runner, hidden = engine.runner, engine.model.config.text_config.hidden_size
    for prompt_len, count in ((628, 1), (628, 6)):
        seqs = []
        for slot in range(count):
            seq = Sequence(EngineRequest(f"p{slot}", [1] * prompt_len, SamplingParams(max_tokens=1), lambda o: None))
            seq.slot = slot
            seq.prompt_embeds = torch.randn(prompt_len, hidden, device="cuda", dtype=torch.float16)
            seqs.append(seq)
        chunks = [PrefillChunk(s, 0, prompt_len) for s in seqs]
        ms = timed(lambda: runner.prefill(chunks), iters=5)
        params = sum(p.numel() for p in engine.model.model.language_model.parameters())
        print(f"prefill {count} x {prompt_len}: {ms:.1f} ms, {2 * params * prompt_len * count / ms / 1e9:.0f} TFLOP/s "
              "(weights only)", flush=True)


def check_parity(engine, image, prompt) -> None:
    """Greedy tokens of the engine vs HF generate on the same weights (fused kernels on the GPU), and where they
    part, how far apart HF's logits had the two tokens (bench/gpu_parity_probe.py does more requests)."""
    from triton_vlm.bench.parity import divergence, hf_greedy_with_logits
    from triton_vlm.sampling import SamplingParams

    theirs, logits = hf_greedy_with_logits(engine.family, engine.model, engine.processor, image, prompt, 32)
    (ours,) = engine.generate([(image, prompt, SamplingParams(max_tokens=32))])
    found = divergence(ours, theirs, logits)
    print(f"greedy parity with HF generate: first {found.length - (found.step is not None)} of {len(theirs)} tokens "
          f"equal; HF's logit gap where they part: {found.gap:.4f}", flush=True)


def main() -> None:
    from triton_vlm.engine import kernels

    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    r = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    w = torch.rand(4096, device="cuda", dtype=torch.float16)
    ref = kernels.rms_norm_torch(x + r, w, 1e-5)
    r2 = r.clone()
    got = kernels.add_rms_norm(x, r2, w, 1e-5)
    print("add_rms_norm max err", (got - ref).abs().max().item(), "res err", (r2 - (x + r)).abs().max().item())
    q = torch.randn(64, 48, 128, device="cuda", dtype=torch.float16)[:, :32]  # strided like a qkv split
    cos = torch.randn(64, 1, 128, device="cuda", dtype=torch.float16)
    sin = torch.randn(64, 1, 128, device="cuda", dtype=torch.float16)
    print("rope max err", (kernels.rope(q, cos, sin) - kernels.rope_torch(q, cos, sin)).abs().max().item())
    gu = torch.randn(64, 2 * 11008, device="cuda", dtype=torch.float16)
    print("silu_mul max err", (kernels.silu_mul(gu) - kernels.silu_mul_torch(gu)).abs().max().item(), flush=True)
    check_decode_attention()
    model, processor = random_llava_7b(torch.device("cuda"))
    family = get_family("llava")
    t = time.perf_counter()
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=768, max_num_seqs=64))
    runner = engine.runner
    layer = runner.decoder.layers[0]
    print(f"engine built in {time.perf_counter() - t:.1f}s; layouts (column-major?): qkv {layer.qkv.stride(0) == 1} "
          f"o {layer.o.stride(0) == 1} gate_up {layer.gate_up.stride(0) == 1} down {layer.down.stride(0) == 1}")
    print("slots", engine.cache.num_slots, flush=True)
    runner.warmup()
    for batch in (1, 64):
        runner._step_inputs[0, :batch] = 699  # write position
        runner._step_inputs[1, :batch] = 700  # attended length
        graph, _ = runner._graphs[(batch, None)]
        print(f"decode batch {batch}: graph {timed(graph.replay):.2f} ms", flush=True)
    weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters()) + \
        model.lm_head.weight.numel() * 2
    print(f"LM weights {weights / 1e9:.2f} GB -> {weights / 3.0e12 * 1e3:.2f} ms at 3.0 TB/s", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner._decode_step(1, None)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    prompt = "Describe this image in detail, including the colors, objects and their positions."
    from triton_vlm.sampling import SamplingParams

    check_parity(engine, image, prompt)
    check_prefill(engine)
    for count in (1, 6):
        items = [(image, prompt, SamplingParams(max_tokens=1))] * count
        engine.generate(items)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(items)
        torch.cuda.synchronize()
        print(f"prefill+vision {count} request(s): {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
    engine.start()
    from bench.gpu_engine_probe import engine_run

    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(192)]
    prompts = [prompt] * len(images)
    t = time.perf_counter()
    for image in images[:32]:
        engine.prepare(image, prompt, SamplingParams(max_tokens=4), lambda out: None)
    print(f"prepare (processor) per request: {(time.perf_counter() - t) / 32 * 1e3:.1f} ms", flush=True)
    engine_run(engine, images, prompts, 1, 1)
    timeline = GpuTimeline(runner)
    for conc, total in ((1, 2), (64, 192)):
        engine.stats = type(engine.stats)()
        result = engine_run(engine, images, prompts, conc, total)
        print(timeline.report(result["seconds"]), flush=True)
        stats = engine.stats
        print(f"engine c{conc}: {result['output_tok_s']:.0f} tok/s in {result['seconds']:.2f}s, ttft p50 "
              f"{result['ttft_p50_s'] * 1e3:.0f} ms; steps {stats.steps}, prefill tokens {stats.prefill_tokens}, "
              f"phases " + ", ".join(f"{k} {v:.2f}s" for k, v in stats.seconds.items()), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
