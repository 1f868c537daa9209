"""A serving benchmark: closed-loop clients streaming from a running server, and the HF-generate baseline.

Each client keeps one request in flight (gRPC streaming, so time to first token and inter-token latency are
seen as a user sees them). Images are distinct per request (no cache can help), EOS is ignored so every
request generates exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import io
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_PROMPT = "Describe this image in detail, including the colors, objects and their positions."
#: The warm-up's images: seeds of their own, so that no measured request finds its image in a prefix cache.
WARM_UP_IMAGE_SEED = 1_000_000


@dataclass(frozen=True)
class Workload:
    model: str
    image_size: int = 336
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 128
    requests: int = 64
    #: Request ``i``'s image is random noise seeded with ``image_seed + i``: distinct per request.
    image_seed: int = 0

    def image(self, index: int) -> bytes:
        pixels = np.random.default_rng(self.image_seed + index).integers(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass
class RunResult:
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    output_tok_s: float
    requests_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def run_served(grpc_url: str, workload: Workload, concurrency: int, timeout: float = 600.0,
               api: str = "stream") -> RunResult:
    """``concurrency`` clients, each with one request at a time, until ``workload.requests`` are done.

    ``api="stream"`` streams from ``<model>_stream`` (TTFT and ITL as a user sees them); ``api="infer"`` sends
    plain ``infer`` calls to the public model (TTFT is then the whole latency)."""
    from triton_vlm.client import TritonVLMClient

    images = [workload.image(i) for i in range(workload.requests)]
    lock = threading.Lock()
    next_index = [0]
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = [0]
    errors = [0]
    first_error: list[str] = []

    def client_loop() -> None:
        client = TritonVLMClient(grpc_url, protocol="grpc", timeout=timeout)
        while True:
            with lock:
                index = next_index[0]
                if index >= workload.requests:
                    return
                next_index[0] += 1
            start = last = time.perf_counter()
            last_tokens = 0
            try:
                if api == "infer":
                    result = client.infer_result(workload.model, images[index], workload.prompt,
                                                 max_tokens=workload.max_tokens, ignore_eos=True)
                    with lock:
                        ttfts.append(time.perf_counter() - start)
                        tokens[0] += result.generated_tokens
                    continue
                for piece in client.stream_pieces(workload.model, images[index], workload.prompt,
                                                  max_tokens=workload.max_tokens, ignore_eos=True):
                    now = time.perf_counter()
                    if last_tokens == 0 and piece.generated_tokens > 0:
                        with lock:
                            ttfts.append(now - start)
                    elif piece.generated_tokens > last_tokens:
                        with lock:
                            itls.append((now - last) / (piece.generated_tokens - last_tokens))
                    last, last_tokens = now, piece.generated_tokens
                with lock:
                    tokens[0] += last_tokens
            except Exception as exc:  # counted, not fatal: a benchmark reports errors
                with lock:
                    errors[0] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}"[:500])

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    elapsed = time.perf_counter() - begin
    done = workload.requests - errors[0]
    return RunResult(concurrency=concurrency, requests=workload.requests, seconds=elapsed, output_tokens=tokens[0],
                     output_tok_s=tokens[0] / elapsed, requests_s=done / elapsed,
                     ttft_p50_s=_percentile(ttfts, 50), ttft_p99_s=_percentile(ttfts, 99),
                     itl_p50_s=_percentile(itls, 50), itl_p99_s=_percentile(itls, 99), errors=errors[0],
                     extra={"api": api, "first_error": first_error[0] if first_error else None})


def warm_up(grpc_url: str, workload: Workload, apis: list[str]) -> None:
    """Two unmeasured requests per API, as the baseline gets its warm-up: the first requests after a start pay
    for kernel compilation and first-call allocations, which a running server has behind it. Their images are not
    the measured ones (a prefix cache would serve those)."""
    for api in apis:
        run_served(grpc_url, replace(workload, requests=2, image_seed=WARM_UP_IMAGE_SEED), 2, api=api)


def run_hf_baseline(runtime: Any, workload: Workload, batch: int) -> RunResult:
    """Plain ``transformers.generate`` on one batch of ``batch`` requests (EOS ignored), in this process: the
    first call at the run's shapes, then the same call again.

    The first call is the baseline (``output_tok_s``), as the GPU issue measured HF (12 tok/s at batch 1, 613 at
    64 on an H100): PyTorch's default SDPA backend there, cuDNN, builds a plan for each new sequence length, which an
    HF server pays for each batch size and length it has not met yet. The repeat finds every plan built (this
    benchmark's requests are all one length) and is recorded beside it (``repeated_tok_s``): 2x faster at 64
    requests on an H100 (bench/results/h100-llava-roofline-fp8.json). A warm-up at another batch size sets up the
    CUDA libraries first.

    A model with no ``generate`` (moondream2 is native: no transformers class) runs the backend's own batched
    generation in-process instead, so the ratio is then what serving adds or saves over that loop."""
    import torch

    loaded = runtime.ensure_loaded()
    model, processor, family = loaded.model, loaded.processor, loaded.family
    hf = callable(getattr(model, "generate", None))

    def prepared(new_tokens: int, count: int) -> Any:
        """What to time: generation alone (inputs prepared first, as a server would have them)."""
        if not hf:
            requests = [runtime.make_request(workload.image(i), workload.prompt, max_tokens=new_tokens,
                                             ignore_eos=True) for i in range(count)]

            def native() -> None:
                errors = [r for r in runtime.generate(requests) if isinstance(r, Exception)]
                if errors:
                    raise errors[0]
            return native
        images = [Image.open(io.BytesIO(workload.image(i))).convert("RGB") for i in range(count)]
        texts = [family.render_prompt(processor, workload.prompt)] * count
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

        def hf_generate() -> None:
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return hf_generate

    def seconds(new_tokens: int = workload.max_tokens, count: int = batch) -> float:
        generate = prepared(new_tokens, count)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(new_tokens=4, count=2 if batch == 1 else 1)  # warm-up at other shapes
    first, repeated = seconds(), seconds()
    produced = batch * workload.max_tokens
    per_token = first / workload.max_tokens
    return RunResult(concurrency=batch, requests=batch, seconds=first, output_tokens=produced,
                     output_tok_s=produced / first, requests_s=batch / first,
                     ttft_p50_s=float("nan"), ttft_p99_s=float("nan"), itl_p50_s=per_token, itl_p99_s=per_token,
                     extra={"kind": "hf_generate_static_batch" if hf else "batched_generation_in_process",
                            "repeated_tok_s": produced / repeated})


@dataclass(frozen=True)
class RoundTrip:
    """What going through Triton adds to one request: the same request, one at a time, in-process and served."""

    requests: int
    max_tokens: int
    direct_p50_s: float
    served_p50_s: float

    @property
    def overhead_p50_s(self) -> float:
        return self.served_p50_s - self.direct_p50_s

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "max_tokens": self.max_tokens, "direct_p50_s": self.direct_p50_s,
                "served_p50_s": self.served_p50_s, "overhead_p50_s": self.overhead_p50_s}


def run_round_trip(runtime: Any, grpc_url: str, workload: Workload, requests: int, max_tokens: int = 1) -> RoundTrip:
    """Alternate one in-process request (``runtime``, the backend's own code path) and one plain ``infer`` through
    the server, ``requests`` times each, same image and prompt; p50 of each. Alternating keeps drift (thermal,
    caches, other load) out of the difference."""
    from triton_vlm.client import TritonVLMClient

    image = workload.image(0)
    client = TritonVLMClient(grpc_url, protocol="grpc", timeout=600)

    def direct() -> float:
        start = time.perf_counter()
        (result,) = runtime.generate([runtime.make_request(image, workload.prompt, max_tokens=max_tokens,
                                                           ignore_eos=True)])
        if isinstance(result, Exception):
            raise result
        return time.perf_counter() - start

    def served() -> float:
        start = time.perf_counter()
        client.infer_result(workload.model, image, workload.prompt, max_tokens=max_tokens, ignore_eos=True)
        return time.perf_counter() - start

    try:
        direct(), served()  # warm-up: lazy loads, first-call allocations
        direct_s: list[float] = []
        served_s: list[float] = []
        for _ in range(requests):
            direct_s.append(direct())
            served_s.append(served())
    finally:
        client.close()
    return RoundTrip(requests=requests, max_tokens=max_tokens, direct_p50_s=median(direct_s),
                     served_p50_s=median(served_s))


def format_table(title: str, rows: list[RunResult]) -> str:
    header = f"{'concurrency':>11} {'tok/s':>10} {'req/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9} {'errors':>6}"
    lines = [title, header]
    for r in rows:
        lines.append(f"{r.concurrency:>11} {r.output_tok_s:>10.1f} {r.requests_s:>8.2f} {ms_column(r.ttft_p50_s, 1)} "
                     f"{ms_column(r.ttft_p99_s, 1)} {ms_column(r.itl_p50_s, 2)} {ms_column(r.itl_p99_s, 2)} {r.errors:>6}")
    return "\n".join(lines)


def ms_column(seconds: float, decimals: int) -> str:
    """A latency column: milliseconds, or ``-`` where the run did not measure it (NaN, e.g. the baseline's
    TTFT: one ``generate`` call has no first-token time)."""
    if math.isnan(seconds):
        return f"{'-':>9}"
    return f"{seconds * 1e3:>7.{decimals}f}ms"


def plot(path: str, served: list[RunResult], baseline: list[RunResult]) -> bool:
    """Throughput vs concurrency, served vs baseline, as a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for api, label in (("stream", "triton-vlm, gRPC streaming"), ("infer", "triton-vlm, plain infer")):
        rows = [r for r in served if r.extra.get("api", "stream") == api]
        if rows:
            ax.plot([r.concurrency for r in rows], [r.output_tok_s for r in rows], "o-", label=label)
    if baseline:
        ax.plot([r.concurrency for r in baseline], [r.output_tok_s for r in baseline], "s--",
                label="HF generate (in-process)")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
