"""GPU probe: a full-size architecture with random fp16 weights, its baseline vs triton-vlm's engine, in-process.

python -m bench.gpu_engine_probe [--model llava|moondream2] --json OUT.json

llava-1.5-7b's baseline is HF generate; moondream2 (native, no transformers class) has the backend's batched
loop (generate_batch) as its baseline.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch
from PIL import Image

from bench.gpu_engine_profile import GpuTimeline
from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.bench.workload import DEFAULT_PROMPT
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family
from triton_vlm.sampling import SamplingParams

NEW_TOKENS = 128


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def probe_inputs(count: int = 8) -> tuple[list[Image.Image], list[str]]:
    """The in-process probes' requests: ``count`` seeded noise images of 336 px and the benchmark's prompt."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]
    return images, [DEFAULT_PROMPT] * count


def hf_generate(model, processor, family, images, prompts) -> tuple[float, list[list[int]]]:
    texts = [family.render_prompt(processor, p) for p in prompts]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    _sync()
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    _sync()
    elapsed = time.perf_counter() - start
    return elapsed, out[:, inputs["input_ids"].shape[1]:].tolist()


def loop_generate(model, processor, family, images, prompts) -> tuple[float, list[list[int]]]:
    """The batched loop the backend runs without the engine (moondream2's baseline)."""
    from triton_vlm.models.generation import generate_batch

    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * len(prompts)
    _sync()
    start = time.perf_counter()
    outputs = generate_batch(family, model, processor, images, prompts, params)
    _sync()
    return time.perf_counter() - start, [list(o.token_ids) for o in outputs]


def load(name: str, tiny: bool) -> tuple:
    """``(family, model, processor)``: the tiny checkpoint on CPU, else the full-size random one on the GPU."""
    family = get_family(name)
    if tiny:
        from triton_vlm.direct import direct_runtime

        loaded = direct_runtime(name, tiny=True, device="cpu").ensure_loaded()
        return family, loaded.model, loaded.processor
    if name == "llava":
        return (family, *random_llava_7b(torch.device("cuda")))
    import tempfile
    from pathlib import Path

    from triton_vlm.bench.checkpoints import save_random_full_size

    path = save_random_full_size(name, Path(tempfile.mkdtemp(prefix=f"{name}-random-")), torch.device("cuda"))
    model, processor = family.load(str(path), revision=None, dtype=torch.float16, device=torch.device("cuda"),
                                   local_files_only=True, trust_remote_code=False)
    return family, model, processor


def decoder_bytes(model) -> int:
    """What one decode step reads at batch 1: the language model's weights."""
    if hasattr(model, "text_model"):  # kosmos2
        language = model.text_model
    else:
        language = model.text if hasattr(model, "text") else [model.model.language_model, model.lm_head]
    modules = language if isinstance(language, list) else [language]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def engine_run(engine, images, prompts, concurrency: int, total: int) -> dict:
    """Closed loop: ``concurrency`` requests in flight until ``total`` are done. A client thread tokenizes and
    submits (as Triton's execute thread would), so the engine thread only generates."""
    params = SamplingParams(max_tokens=NEW_TOKENS)
    lock = threading.Lock()
    free = threading.Semaphore(concurrency)
    done = threading.Event()
    state = {"finished": 0, "tokens": 0}
    first: dict[str, float] = {}
    started: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}

    def on_output(out) -> None:
        now = time.perf_counter()
        with lock:
            first.setdefault(out.request_id, now)
            outputs[out.request_id].extend(out.new_token_ids)
            state["tokens"] += len(out.new_token_ids)
            if out.finished:
                state["finished"] += 1
                if state["finished"] == total:
                    done.set()
        if out.finished:
            free.release()

    def client() -> None:
        for i in range(total):
            free.acquire()
            request = engine.prepare(images[i % len(images)], prompts[i % len(prompts)], params, on_output,
                                     request_id=f"r{i}", ignore_eos=True)
            with lock:
                outputs[request.request_id] = []
                started[request.request_id] = time.perf_counter()
            engine.submit(request)

    begin = time.perf_counter()
    threading.Thread(target=client, daemon=True).start()
    done.wait(600)
    elapsed = time.perf_counter() - begin
    ttft = [first[r] - started[r] for r in started]
    return {"concurrency": concurrency, "requests": total, "seconds": elapsed,
            "output_tok_s": state["tokens"] / elapsed, "ttft_p50_s": float(np.median(ttft)),
            "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny checkpoint")
    parser.add_argument("--model", choices=["llava", "moondream2", "kosmos2"], default="llava")
    args = parser.parse_args()
    if torch.cuda.is_available():
        # The engine keeps SDPA off cuDNN in its process; the baseline runs with the same attention kernels, so
        # the greedy comparison below measures the engine, not cuDNN's rounding against flash attention's.
        from triton_vlm.engine.attention import avoid_per_shape_attention_plans

        avoid_per_shape_attention_plans(torch.device("cuda"))
    t = time.perf_counter()
    family, model, processor = load(args.model, args.tiny)
    print(f"built model in {time.perf_counter() - t:.1f}s", flush=True)
    images, prompts = probe_inputs()
    results: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__}
    baseline = loop_generate if args.model == "moondream2" else hf_generate
    results["baseline"] = baseline.__name__

    baseline(model, processor, family, images[:1], prompts[:1])  # warm-up
    hf_b1, hf_tokens = baseline(model, processor, family, images[:1], prompts[:1])
    results["hf_b1_tok_s"] = NEW_TOKENS / hf_b1
    print("baseline b1", results["hf_b1_tok_s"], flush=True)
    b = args.hf_batch
    hf_bn, _ = baseline(model, processor, family, [images[i % 8] for i in range(b)], [prompts[0]] * b)
    results[f"hf_b{b}_tok_s"] = NEW_TOKENS * b / hf_bn
    print(f"baseline b{b}", results[f"hf_b{b}_tok_s"], flush=True)

    t = time.perf_counter()
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024,
                                                              max_num_seqs=64))
    engine.runner.warmup()
    engine.start()
    print(f"engine ready in {time.perf_counter() - t:.1f}s; slots {engine.cache.num_slots}", flush=True)
    engine_run(engine, images, prompts, 1, 2)  # warm-up (graph capture of longer contexts)
    b1 = engine_run(engine, images, prompts, 1, 3)
    results["engine_b1_tok_s"] = b1["output_tok_s"]
    results["engine_ttft_b1_s"] = b1["ttft_p50_s"]
    same = b1["outputs"]["r0"]
    match = next((i for i, (a, c) in enumerate(zip(same, hf_tokens[0])) if a != c), len(same))
    results["engine_vs_hf_greedy_matching_prefix"] = match
    print("engine b1", b1["output_tok_s"], "ttft", b1["ttft_p50_s"], "match prefix", match, flush=True)
    engine_run(engine, images, prompts, 64, 64)  # warm-up
    engine.stats = type(engine.stats)()
    timeline = GpuTimeline(engine.runner) if torch.cuda.is_available() else None
    c64 = engine_run(engine, images, prompts, 64, 192)
    print(f"engine c64 steps {engine.stats.steps}; host phases " + ", ".join(
        f"{k} {v:.2f}s" for k, v in engine.stats.seconds.items()), flush=True)
    if timeline is not None:
        print(timeline.report(c64["seconds"]), flush=True)
    results["engine_c64_tok_s"] = c64["output_tok_s"]
    results["engine_c64_ttft_p50_s"] = c64["ttft_p50_s"]
    print("engine c64", c64["output_tok_s"], flush=True)
    engine.shutdown()
    results["roofline_b1_tok_s"] = 3.0e12 / decoder_bytes(model)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
