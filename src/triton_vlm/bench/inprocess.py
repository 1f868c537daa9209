"""What the in-process GPU tools share (:mod:`~triton_vlm.bench.gpu_roofline`,
:mod:`~triton_vlm.bench.gpu_decode_profile`): their requests, HF ``generate`` timed on one batch, closed-loop clients
on a running engine, and device time per engine phase from CUDA events.

No Triton here: the engine runs in this process, as the served ``<model>_stream`` runs it in its stub.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from triton_vlm.bench.workload import DEFAULT_PROMPT
from triton_vlm.engine import LLMEngine, RequestOutput
from triton_vlm.sampling import SamplingParams

#: Tokens each request generates, EOS ignored (as the served benchmark's workload).
NEW_TOKENS = 128


def probe_inputs(count: int = 8) -> tuple[list[Image.Image], list[str]]:
    """``count`` seeded noise images of 336 px and the served benchmark's prompt for each."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]
    return images, [DEFAULT_PROMPT] * count


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_generate(model: Any, processor: Any, family: Any, images: list[Image.Image], prompts: list[str],
                new_tokens: int = NEW_TOKENS) -> tuple[float, list[list[int]]]:
    """Seconds HF ``generate`` takes for one batch of requests (greedy, exactly ``new_tokens`` each, inputs
    prepared beforehand as a server would have them), and the tokens it chose."""
    texts = [family.render_prompt(processor, p) for p in prompts]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    _sync()
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync()
    elapsed = time.perf_counter() - start
    return elapsed, out[:, inputs["input_ids"].shape[1]:].tolist()


def engine_run(engine: LLMEngine, images: list[Image.Image], prompts: list[str], concurrency: int, total: int,
               new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Closed loop on a started engine: ``concurrency`` requests in flight until ``total`` are done, each
    ``new_tokens`` long (EOS ignored). A client thread tokenizes and submits, as Triton's execute thread would,
    so the engine thread only generates. Returns throughput, TTFT p50 and each request's tokens."""
    params = SamplingParams(max_tokens=new_tokens)
    lock = threading.Lock()  # guards the counters and dicts below: the engine thread and the client thread write
    free = threading.Semaphore(concurrency)
    done = threading.Event()
    finished = tokens = 0
    first: dict[str, float] = {}
    started: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}

    def on_output(out: RequestOutput) -> None:
        nonlocal finished, tokens
        now = time.perf_counter()
        with lock:
            first.setdefault(out.request_id, now)
            outputs[out.request_id].extend(out.new_token_ids)
            tokens += len(out.new_token_ids)
            if out.finished:
                finished += 1
                if finished == total:
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
    if not done.wait(600):
        raise TimeoutError(f"{finished} of {total} requests finished in 600 s")
    elapsed = time.perf_counter() - begin
    ttft = [first[r] - started[r] for r in started]
    return {"concurrency": concurrency, "requests": total, "seconds": elapsed, "output_tok_s": tokens / elapsed,
            "ttft_p50_s": float(np.median(ttft)), "outputs": outputs}


def timed(fn: Callable[[], object], iters: int = 20) -> float:
    """Mean milliseconds of device time per call of ``fn`` (CUDA events around ``iters`` calls, after warm-up)."""
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
    return float(start.elapsed_time(end)) / iters


class GpuTimeline:
    """CUDA events around the runner's phase methods (its public ``build_prompt_embeds``, ``prefill``, ``decode``
    and ``prefill_and_decode``, wrapped on this runner instance): device time per phase, and the device's idle
    time between phases."""

    PHASES = ("build_prompt_embeds", "prefill", "decode", "prefill_and_decode")

    def __init__(self, runner: Any) -> None:
        self.marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        for phase in self.PHASES:
            setattr(runner, phase, self._wrap(phase, getattr(runner, phase)))

    def _wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
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
        """One line: the device's span against ``wall_s``, each phase's seconds and calls, the gaps between."""
        counts = Counter(phase for phase, _start, _end in self.marks)
        busy, span = self.busy_seconds()
        idle = span - sum(busy.values())
        return (f"gpu span {span:.2f}s of wall {wall_s:.2f}s; " + ", ".join(
            f"{p} {busy[p]:.2f}s/{counts[p]} calls" for p in busy) + f"; between phases {idle:.2f}s")
