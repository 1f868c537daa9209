#!/usr/bin/env python3
"""vLLM peer benchmark for llava-1.5-7b (fp16) on one GPU.

Workload (same as triton_vlm.bench.workload): one 336x336 random RGB image (PNG,
distinct per request: np.random.default_rng(seed)) + the text prompt in
llava-1.5 chat format "USER: <image>\\n{prompt} ASSISTANT:", greedy
(temperature 0), max_tokens=128, ignore_eos=True.

Measures
  * c1: after warm-up, N sequential requests -> median per-request output tok/s
        (tokens / end-to-end latency) and median TTFT.
  * c64: closed loop, 64 requests in flight, 192 requests -> total output
        tokens / wall time.
Prints one JSON line (last line of stdout):
  {"b1_tok_s":..., "ttft_b1_s":..., "c64_tok_s":..., ...extras}

Modes
  --mode engine (default): vLLM's AsyncLLM in this process (engine core in
        vLLM's own background process), streaming DELTA outputs.
  --mode server: starts `python -m vllm.entrypoints.openai.api_server` on
        127.0.0.1 and drives /v1/chat/completions (stream, return_token_ids)
        with aiohttp clients; images sent as base64 PNG data URLs.

Model dir: a llava checkpoint directory (config.json + tokenizer/processor
files, e.g. from `python3 -m triton_vlm.bench.checkpoints llava DIR`).  If it
holds no *.safetensors, load_format="dummy" is used (random weights; same
speed).  `--write-meta DIR` writes only config + processor files with the
project's own builders (needs the project's src/ on sys.path) and exits.

Usage on the GPU machine (after install_on_device.sh):
  PYTHONPATH=/tmp/site python3 run_vllm_llava.py --model /tmp/llava7b
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

# No network on the GPU machine: never try the hub, never phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# xgrammar imports apache-tvm-ffi, which would otherwise try to JIT-build a torch DLPack
# add-on (nvcc, minutes) when torch lacks __dlpack_c_exchange_api__; structured output is unused.
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
# vLLM logs (also its engine-core process's) go to stderr: stdout keeps only the JSON line.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

DEFAULT_PROMPT = "Describe this image in detail, including the colors, objects and their positions."


# fp8 for the language model only, as triton-vlm's fp8: vLLM 0.26's online fp8 linear fails on the llava projector
# with several images in one batch ("view size is not compatible"), so the projector stays in 16 bits.
FP8_OVERRIDES = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "is_checkpoint_fp8_serialized": False,
                                         "ignored_layers": ["multi_modal_projector.linear_1",
                                                            "multi_modal_projector.linear_2"]}}


def log(*a):
    print("[run_vllm_llava]", *a, file=sys.stderr, flush=True)


def image_png(seed: int, size: int = 336) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_to_pil(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def model_settings(ns):
    """load_format and hf_overrides for the checkpoint directory."""
    has_weights = bool(glob.glob(os.path.join(ns.model, "*.safetensors")))
    load_format = ns.load_format or ("auto" if has_weights else "dummy")
    hf_overrides = None
    try:
        with open(os.path.join(ns.model, "config.json")) as f:
            cfg = json.load(f)
        if not cfg.get("architectures"):
            hf_overrides = {"architectures": ["LlavaForConditionalGeneration"]}
    except OSError:
        pass
    return load_format, hf_overrides


# ----------------------------------------------------------------------------
# engine mode: AsyncLLM
# ----------------------------------------------------------------------------
async def engine_request(engine, sp, prompt_text, png, rid):
    t0 = time.perf_counter()
    image = png_to_pil(png)
    first = None
    ntok = 0
    nprompt = None
    async for out in engine.generate(
        {"prompt": prompt_text, "multi_modal_data": {"image": image}}, sp, request_id=rid
    ):
        if nprompt is None and out.prompt_token_ids:
            nprompt = len(out.prompt_token_ids)
        got = len(out.outputs[0].token_ids) if out.outputs else 0
        if got and first is None:
            first = time.perf_counter()
        ntok += got
    t1 = time.perf_counter()
    return {"ttft": (first or t1) - t0, "latency": t1 - t0, "tokens": ntok, "prompt_tokens": nprompt}


async def run_engine(ns):
    import vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    load_format, hf_overrides = model_settings(ns)
    kwargs = dict(
        model=ns.model,
        tokenizer=ns.model,
        dtype=ns.dtype,
        max_model_len=ns.max_model_len,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        load_format=load_format,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        enforce_eager=ns.enforce_eager,
        disable_log_stats=True,
    )
    if ns.fp8:  # fp8 weights (dynamic scales) and fp8 KV cache, as the project's opt-in fp8
        kwargs.update(quantization="fp8", kv_cache_dtype="fp8")
        hf_overrides = {**(hf_overrides or {}), **FP8_OVERRIDES}
    if hf_overrides:
        kwargs["hf_overrides"] = hf_overrides
    log(f"vllm {vllm.__version__}; engine args: {kwargs}")
    t_start = time.perf_counter()
    # OPENAI_API_SERVER context = the scheduler defaults `vllm serve` uses on an H100
    # (max_num_batched_tokens 8192, max_num_seqs 1024); ENGINE_CONTEXT would fall back
    # to 2048 / 128.
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs),
                                       usage_context=UsageContext.OPENAI_API_SERVER)
    startup_s = time.perf_counter() - t_start
    sched = engine.vllm_config.scheduler_config
    sched_info = {"max_num_batched_tokens": sched.max_num_batched_tokens,
                  "max_num_seqs": sched.max_num_seqs}
    log(f"engine up in {startup_s:.1f}s; scheduler {sched_info}")

    sp = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, ignore_eos=True,
                        output_kind=RequestOutputKind.DELTA)
    prompt_text = f"USER: <image>\n{ns.prompt} ASSISTANT:"

    def one(png, rid):
        return engine_request(engine, sp, prompt_text, png, rid)

    try:
        res = await bench(ns, functools.partial(closed_loop, one))
    finally:
        engine.shutdown()
    res.update(mode="engine", load_format=load_format, startup_s=round(startup_s, 1),
               vllm_version=vllm.__version__, **sched_info)
    return res


# ----------------------------------------------------------------------------
# server mode: OpenAI-compatible server + aiohttp streaming clients
# ----------------------------------------------------------------------------
async def server_request(session, url, ns, png, rid):
    body = {
        "model": "llava",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": ns.prompt},
        ]}],
        "max_tokens": ns.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "add_special_tokens": True,  # BOS, as the raw-prompt path and the project's processor add it
    }
    t0 = time.perf_counter()
    first = None
    ntok = 0
    usage = None
    async with session.post(url + "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    msg = json.loads(data)
                    if msg.get("usage"):
                        usage = msg["usage"]
                    for ch in msg.get("choices") or []:
                        got = len(ch.get("token_ids") or [])
                        if got and first is None:
                            first = time.perf_counter()
                        ntok += got
    t1 = time.perf_counter()
    if usage and usage.get("completion_tokens"):
        ntok = usage["completion_tokens"]
    return {"ttft": (first or t1) - t0, "latency": t1 - t0, "tokens": ntok,
            "prompt_tokens": (usage or {}).get("prompt_tokens")}


async def run_server(ns):
    import aiohttp

    load_format, hf_overrides = model_settings(ns)
    port = ns.port
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", ns.model, "--tokenizer", ns.model, "--served-model-name", "llava",
           "--host", "127.0.0.1", "--port", str(port),
           "--dtype", ns.dtype, "--max-model-len", str(ns.max_model_len),
           "--gpu-memory-utilization", str(ns.gpu_memory_utilization),
           "--load-format", load_format, "--limit-mm-per-prompt", json.dumps({"image": 1}),
           "--seed", "0", "--disable-log-stats"]
    if ns.enforce_eager:
        cmd.append("--enforce-eager")
    if ns.fp8:  # as the engine mode: fp8 weights (dynamic scales) and fp8 KV cache
        cmd += ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
        hf_overrides = {**(hf_overrides or {}), **FP8_OVERRIDES}
    if hf_overrides:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    log("starting:", " ".join(cmd))
    with open(ns.server_log, "w") as logf:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    t_start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {ns.server_log}")
                if time.perf_counter() - t_start > ns.server_start_timeout:
                    raise RuntimeError(f"server not healthy after {ns.server_start_timeout}s; see {ns.server_log}")
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
            startup_s = time.perf_counter() - t_start
            log(f"server healthy in {startup_s:.1f}s")

            def one(png, rid):
                return server_request(session, url, ns, png, rid)

            res = await bench(ns, functools.partial(closed_loop, one))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    import vllm
    res.update(mode="server", load_format=load_format, startup_s=round(startup_s, 1),
               vllm_version=vllm.__version__)
    return res


# ----------------------------------------------------------------------------
async def closed_loop(one_request, seeds, concurrency):
    """``concurrency`` clients, each with one request in flight, until every seed's image was asked about;
    ``one_request(png, request_id)`` is the mode's request. Returns (results, wall seconds)."""
    pngs = [image_png(s) for s in seeds]
    results = []
    nxt = [0]

    async def worker():
        while nxt[0] < len(pngs):
            i = nxt[0]
            nxt[0] += 1
            results.append(await one_request(pngs[i], f"r{seeds[i]}-{uuid.uuid4().hex[:8]}"))

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return results, time.perf_counter() - t0


async def bench(ns, closed_loop):
    # seeds: warm-up 100000+, c1 200000+, c64 warm-up 300000+, c64 measured 0..N-1 (all distinct)
    log(f"warm-up: {ns.warmup} sequential requests")
    await closed_loop(list(range(100000, 100000 + ns.warmup)), 1)

    log(f"c1: {ns.b1_requests} sequential requests")
    r1, _ = await closed_loop(list(range(200000, 200000 + ns.b1_requests)), 1)
    b1_rates = [r["tokens"] / r["latency"] for r in r1]
    out = {
        "b1_tok_s": round(statistics.median(b1_rates), 2),
        "ttft_b1_s": round(statistics.median(r["ttft"] for r in r1), 4),
        "b1_itl_s": round(statistics.median((r["latency"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in r1), 5),
        "b1_tok_s_all": [round(x, 2) for x in b1_rates],
    }
    log(f"c1 result: {out}")

    if ns.c64_warmup:
        log(f"c{ns.concurrency} warm-up: {ns.concurrency} requests")
        await closed_loop(list(range(300000, 300000 + ns.concurrency)), ns.concurrency)
    log(f"c{ns.concurrency}: {ns.c64_requests} requests, closed loop")
    rc, wall = await closed_loop(list(range(ns.c64_requests)), ns.concurrency)
    tokens = sum(r["tokens"] for r in rc)
    out.update({
        "c64_tok_s": round(tokens / wall, 1),
        "c64_seconds": round(wall, 3),
        "c64_requests": len(rc),
        "c64_concurrency": ns.concurrency,
        "c64_req_s": round(len(rc) / wall, 2),
        "c64_ttft_p50_s": round(pct([r["ttft"] for r in rc], 50), 4),
        "c64_ttft_p99_s": round(pct([r["ttft"] for r in rc], 99), 4),
        "output_tokens_per_request": sorted({r["tokens"] for r in rc + r1}),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in rc + r1 if r["prompt_tokens"]}),
        "max_tokens": ns.max_tokens,
    })
    return out


def write_meta(target, src):
    """config.json + processor/tokenizer files of the project's random llava-1.5-7b (no weights)."""
    sys.path.insert(0, src)
    from triton_vlm.bench.checkpoints import llava_7b_config, llava_7b_processor

    os.makedirs(target, exist_ok=True)
    llava_7b_processor().save_pretrained(target)
    cfg = llava_7b_config()
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(target)
    with open(os.path.join(target, "config.json")) as f:
        c = json.load(f)
    c["dtype"] = "float16"
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    log(f"wrote config + processor files to {target}: {sorted(os.listdir(target))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="llava checkpoint dir (config + processor files; safetensors optional)")
    ap.add_argument("--mode", choices=["engine", "server"], default="engine")
    ap.add_argument("--load-format", default=None, help="override (default: auto if *.safetensors else dummy)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--fp8", action="store_true", help="fp8 weights + fp8 KV cache")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (not for timing)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--b1-requests", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--c64-requests", type=int, default=192)
    ap.add_argument("--no-c64-warmup", dest="c64_warmup", action="store_false")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--server-log", default="/tmp/vllm_server.log")
    ap.add_argument("--server-start-timeout", type=float, default=480)
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    ap.add_argument("--write-meta", metavar="DIR", help="write config+processor files (no weights) and exit")
    ap.add_argument("--project-src", default=os.path.join(os.getcwd(), "src"),
                    help="the project's src/ (for --write-meta)")
    ap.add_argument("--dtype", default=None,
                    help="activations (default: float16; bfloat16 with --fp8, which vLLM's FA3 fp8 KV cache needs)")
    ns = ap.parse_args()
    ns.dtype = ns.dtype or ("bfloat16" if ns.fp8 else "float16")

    if ns.write_meta:
        write_meta(ns.write_meta, ns.project_src)
        return
    if not ns.model:
        ap.error("--model is required")

    runner = run_engine if ns.mode == "engine" else run_server
    res = asyncio.run(runner(ns))
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        res["torch"] = torch.__version__
    except Exception:
        pass
    line = json.dumps(res)
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
