"""GPU probe: llava-1.5-7b architecture (random fp16 weights), HF generate vs triton-vlm's engine, in-process.

python bench/gpu_engine_probe.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch
from PIL import Image

from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family
from triton_vlm.sampling import SamplingParams

NEW_TOKENS = 128


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    args = parser.parse_args()
    family = get_family("llava")
    t = time.perf_counter()
    if args.tiny:
        from triton_vlm.direct import direct_runtime

        loaded = direct_runtime("llava", tiny=True, device="cpu").ensure_loaded()
        model, processor = loaded.model, loaded.processor
    else:
        model, processor = random_llava_7b(torch.device("cuda"))
    print(f"built model in {time.perf_counter() - t:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(8)]
    prompts = ["Describe this image in detail, including the colors, objects and their positions."] * 8
    results: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}

    hf_generate(model, processor, family, images[:1], prompts[:1])  # warm-up
    hf_b1, hf_tokens = hf_generate(model, processor, family, images[:1], prompts[:1])
    results["hf_b1_tok_s"] = NEW_TOKENS / hf_b1
    print("hf b1", results["hf_b1_tok_s"], flush=True)
    b = args.hf_batch
    hf_bn, _ = hf_generate(model, processor, family, [images[i % 8] for i in range(b)], [prompts[0]] * b)
    results[f"hf_b{b}_tok_s"] = NEW_TOKENS * b / hf_bn
    print(f"hf b{b}", results[f"hf_b{b}_tok_s"], flush=True)

    t = time.perf_counter()
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024, max_num_seqs=64))
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
    c64 = engine_run(engine, images, prompts, 64, 192)
    results["engine_c64_tok_s"] = c64["output_tok_s"]
    results["engine_c64_ttft_p50_s"] = c64["ttft_p50_s"]
    print("engine c64", c64["output_tok_s"], flush=True)
    engine.shutdown()
    results["roofline_b1_tok_s"] = 3.0e12 / sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
