"""One engine step on the GPU, kernel by kernel (a full-size architecture with random fp16 weights, in-process).

python -m triton_vlm.bench.gpu_decode_profile --model llava|kosmos2|moondream2 [--batch 64] [--context 150]
    [--quantization fp8] [--kv-cache-dtype fp8] [--prefill N] [--prefill-chunk START,LENGTH] [--vision N1,N2,...]
    [--vision-overlap N]

Times one decode step of ``--batch`` rows that each attend to ``--context`` positions (as the engine replays it,
from its CUDA graph) and profiles it run eagerly, kernel by kernel. ``--prefill N`` also profiles one prefill step
of N packed 628-position prompts (llava's image + prompt); ``--prefill-chunk 624,96`` times one chunk of 96
positions after 624 cached ones (a chat's turn 2) as the host launches it and as the device runs it (where the
host's time is the larger, a short prefill costs what its launches cost); ``--vision N1,N2`` times the prompt embeddings (vision
tower, projector, token embeddings) of N new requests per N and profiles the largest; ``--vision-overlap N`` times
N requests' vision and the decode step one after the other, as the engine runs them, against side by side on two
streams (what the decode step could hide). Recorded runs: bench/results/h100-llava-fp8-profile.txt,
h100-llava-vision-profile.txt, h100-vision-overlap.txt.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from triton_vlm.bench.checkpoints import load_random_full_size
from triton_vlm.bench.inprocess import probe_inputs, timed
from triton_vlm.engine import EngineConfig, EngineRequest, LLMEngine
from triton_vlm.engine.request import Sequence, SequenceStatus
from triton_vlm.engine.scheduler import PrefillChunk
from triton_vlm.sampling import SamplingParams


def main() -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llava", "llava_next", "moondream2", "kosmos2"], default="kosmos2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=150, help="positions each row attends to")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many prompts")
    parser.add_argument("--prefill-chunk", default="", metavar="START,LENGTH",
                        help="also time one prefill chunk of LENGTH positions after START cached ones: host and device")
    parser.add_argument("--vision-overlap", type=int, default=0, metavar="N",
                        help="also time N requests' vision beside the decode step")
    parser.add_argument("--vision", default="", metavar="N1,N2", help="also time and profile N requests' vision")
    args = parser.parse_args()
    family, model, processor = load_random_full_size(args.model, torch.device("cuda"))
    engine = LLMEngine(family, model, processor, EngineConfig(
        max_model_len=768, max_num_seqs=64, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype))
    engine.runner.warmup()
    for batch in sorted({1, args.batch}):
        ms = timed(decode_step(engine, batch, args.context))
        print(f"{args.model} decode batch {batch}, context {args.context}: graph {ms:.2f} ms", flush=True)
    print_profile(decode_step(engine, args.batch, args.context, graphs=False), rows=14, repeats=3)
    if args.prefill:
        profile_prefill(engine, args.prefill)
    if args.prefill_chunk:
        start, length = (int(n) for n in args.prefill_chunk.split(","))
        time_prefill_chunk(engine, start, length)
    if args.vision_overlap:
        time_vision_overlap(engine, args.vision_overlap, args.batch, args.context)
    if args.vision:
        profile_vision(engine, [int(n) for n in args.vision.split(",")])


def print_profile(fn: Callable[[], object], rows: int, repeats: int = 1) -> None:
    """The CUDA kernels of ``repeats`` calls of ``fn``, by total device time."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def decode_step(engine: LLMEngine, batch: int, context: int, graphs: bool = True) -> Callable[[], object]:
    """One decode step of ``batch`` rows (slots 0 to batch - 1), each writing position ``context - 1`` and
    attending to ``context`` positions: from the engine's CUDA graph, or eagerly (``graphs=False``), where a
    profiler sees every kernel."""
    seqs = []
    for slot in range(batch):
        seq = Sequence(EngineRequest(f"d{slot}", [1] * context, SamplingParams(max_tokens=1), _ignore))
        seq.slot, seq.status = slot, SequenceStatus.DECODING
        seqs.append(seq)
    runner = engine.runner

    def step() -> None:
        # The runner replays a graph where it has graphs; off for this call, its decode runs kernel by kernel.
        saved, runner.use_graphs = runner.use_graphs, graphs and runner.use_graphs
        try:
            runner.decode(seqs, need_logits=False)
        finally:
            runner.use_graphs = saved
    return step


def profile_prefill(engine: LLMEngine, count: int, prompt_len: int = 628) -> None:
    """Time and profile one prefill step of ``count`` packed prompts of ``prompt_len`` positions."""
    chunks = []
    device = engine.runner.device
    for slot in range(count):
        seq = Sequence(EngineRequest(f"p{slot}", [1] * prompt_len, SamplingParams(max_tokens=1), _ignore))
        seq.slot = slot
        ids = torch.randint(0, 1000, (prompt_len,), device=device)
        with torch.inference_mode():
            seq.prompt_embeds = engine.decoder.embed_tokens(ids)
        chunks.append(PrefillChunk(seq, 0, prompt_len))
    ms = timed(lambda: engine.runner.prefill(chunks), iters=5)
    print(f"prefill {count} x {prompt_len}: {ms:.1f} ms", flush=True)
    print_profile(lambda: engine.runner.prefill(chunks), rows=16)


def time_prefill_chunk(engine: LLMEngine, start: int, length: int, iters: int = 20) -> None:
    """One chunk of ``length`` positions after ``start`` cached ones (slot 0): the host's time to launch it (the
    call returning, nothing waited for) against the device's span (CUDA events), each a median of ``iters``; then
    its kernels."""
    seq = Sequence(EngineRequest("c", [1] * (start + length), SamplingParams(max_tokens=1), _ignore))
    seq.slot = 0
    with torch.inference_mode():
        seq.prompt_embeds = engine.decoder.embed_tokens(
            torch.randint(0, 1000, (start + length,), device=engine.runner.device))
    chunks = [PrefillChunk(seq, start, length)]
    host, device = [], []
    for _ in range(iters + 3):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        clock = time.perf_counter()
        begin.record()
        engine.runner.prefill(chunks)
        end.record()
        host.append((time.perf_counter() - clock) * 1e3)
        torch.cuda.synchronize()
        device.append(begin.elapsed_time(end))
    # The device's span includes its idle gaps while the host launches; the profile's kernel sum has none.
    print(f"prefill chunk {length} after {start}: host launch {statistics.median(host[3:]):.2f} ms, "
          f"device span {statistics.median(device[3:]):.2f} ms", flush=True)
    print_profile(lambda: engine.runner.prefill(chunks), rows=12)


def new_sequences(engine: LLMEngine, count: int) -> list[Sequence]:
    """``count`` prepared requests with noise images, as the scheduler admits them."""
    images, prompts = probe_inputs(count)
    return [Sequence(engine.prepare(image, prompt, SamplingParams(max_tokens=1), _ignore), max_generated=1)
            for image, prompt in zip(images, prompts, strict=True)]


def profile_vision(engine: LLMEngine, counts: list[int]) -> None:
    """Time the prompt embeddings of each count of new requests; profile the last count's."""
    runner = engine.runner
    seqs: list[Sequence] = []
    for count in counts:
        seqs = new_sequences(engine, count)
        ms = timed(lambda: runner.build_prompt_embeds(seqs), iters=10)  # noqa: B023 (called here)
        print(f"vision of {count} requests: {ms:.2f} ms, {ms / count:.2f} ms an image", flush=True)
    print_profile(lambda: runner.build_prompt_embeds(seqs), rows=20)


def time_vision_overlap(engine: LLMEngine, images: int, batch: int, context: int) -> None:
    """Vision of ``images`` new requests and a decode step of ``batch`` rows: alone, one after the other, and
    side by side on two streams."""
    seqs = new_sequences(engine, images)
    runner = engine.runner
    decode = decode_step(engine, batch, context)
    side = torch.cuda.Stream()

    def vision() -> None:
        runner.build_prompt_embeds(seqs)

    def one_after_the_other() -> None:
        vision()
        decode()

    def side_by_side() -> None:
        decode()  # queued first, so the GPU has it while the host launches the vision kernels
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            vision()
        torch.cuda.current_stream().wait_stream(side)

    times = {name: timed(fn) for name, fn in (("vision", vision), ("decode", decode),
                                               ("one after the other", one_after_the_other),
                                               ("side by side", side_by_side))}
    print(f"{images} images' vision and a decode step of {batch} rows: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()), flush=True)


def _ignore(output: Any) -> None:
    """Requests built here are never submitted: nothing reports to them."""


if __name__ == "__main__":
    main()
