"""One decode step of an engine model on the GPU, kernel by kernel (full-size random fp16 weights).

python -m bench.gpu_decode_profile --model kosmos2 [--batch 64] [--context 150] [--quantization fp8]
    [--kv-cache-dtype fp8] [--prefill 6]

With --prefill N it also profiles one prefill step of N packed 628-token prompts (llava's image + prompt). With
--vision-overlap N it times the prompt embeddings (vision) of N new requests and the decode step one after the
other, as the engine runs them, against side by side on two streams: what the decode step could hide. With
--vision N1,N2,... it times the prompt embeddings of N new requests (vision tower, projector, embeddings) per N and
profiles the largest, kernel by kernel.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_engine_probe import load
from bench.gpu_engine_profile import timed
from triton_vlm.engine import EngineConfig, LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["llava", "moondream2", "kosmos2"], default="kosmos2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=150, help="positions each row attends to")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many prompts")
    parser.add_argument("--vision-overlap", type=int, default=0, metavar="N",
                        help="also time N requests' vision beside the decode step")
    parser.add_argument("--vision", default="", metavar="N1,N2", help="also time and profile N requests' vision")
    args = parser.parse_args()
    family, model, processor = load(args.model, tiny=False)
    engine = LLMEngine(family, model, processor, EngineConfig(
        max_model_len=768, max_num_seqs=64, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype))
    runner = engine.runner
    runner.warmup()
    for batch in sorted({1, args.batch}):
        runner._step_inputs[0, :batch] = args.context - 1  # write position
        runner._step_inputs[1, :batch] = args.context  # attended length
        graph, _ = runner._graphs[(batch, None)]
        print(f"{args.model} decode batch {batch}, context {args.context}: graph {timed(graph.replay):.2f} ms",
              flush=True)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner._decode_step(args.batch, None)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    if args.prefill:
        profile_prefill(engine, args.prefill)
    if args.vision_overlap:
        time_vision_overlap(engine, args.vision_overlap, args.batch)
    if args.vision:
        profile_vision(engine, [int(n) for n in args.vision.split(",")])


def profile_prefill(engine: LLMEngine, count: int, prompt_len: int = 628) -> None:
    from triton_vlm.engine.request import EngineRequest, Sequence
    from triton_vlm.engine.scheduler import PrefillChunk
    from triton_vlm.sampling import SamplingParams

    hidden = engine.decoder.embed_tokens.weight.shape[1]
    chunks = []
    for slot in range(count):
        seq = Sequence(EngineRequest(f"p{slot}", [1] * prompt_len, SamplingParams(max_tokens=1), lambda o: None))
        seq.slot = slot
        seq.prompt_embeds = torch.randn(prompt_len, hidden, device="cuda", dtype=engine.model.dtype)
        chunks.append(PrefillChunk(seq, 0, prompt_len))
    ms = timed(lambda: engine.runner.prefill(chunks), iters=5)
    print(f"prefill {count} x {prompt_len}: {ms:.1f} ms", flush=True)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.runner.prefill(chunks)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60), flush=True)


def new_sequences(engine: LLMEngine, count: int) -> list:
    """``count`` prepared requests with noise images, as the scheduler admits them."""
    import numpy as np
    from PIL import Image

    from triton_vlm.engine.request import Sequence
    from triton_vlm.sampling import SamplingParams

    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(count):
        image = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
        request = engine.prepare(image, "Describe this image in detail.", SamplingParams(max_tokens=1), lambda o: None)
        seqs.append(Sequence(request, max_generated=1))
    return seqs


def profile_vision(engine: LLMEngine, counts: list[int]) -> None:
    runner = engine.runner
    for count in counts:
        seqs = new_sequences(engine, count)
        ms = timed(lambda: runner.build_prompt_embeds(seqs), iters=10)  # noqa: B023 (called here)
        print(f"vision of {count} requests: {ms:.2f} ms, {ms / count:.2f} ms an image", flush=True)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.build_prompt_embeds(seqs)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60), flush=True)


def time_vision_overlap(engine: LLMEngine, images: int, batch: int) -> None:
    seqs = new_sequences(engine, images)
    runner = engine.runner
    graph, _ = runner._graphs[(batch, None)]
    side = torch.cuda.Stream()

    def vision() -> None:
        runner.build_prompt_embeds(seqs)

    def one_after_the_other() -> None:
        vision()
        graph.replay()

    def side_by_side() -> None:
        graph.replay()  # queued first, so the GPU has it while the host launches the vision kernels
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            vision()
        torch.cuda.current_stream().wait_stream(side)

    times = {name: timed(fn) for name, fn in (("vision", vision), ("decode", graph.replay),
                                               ("one after the other", one_after_the_other),
                                               ("side by side", side_by_side))}
    print(f"{images} images' vision and a decode step of {batch} rows: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()), flush=True)


if __name__ == "__main__":
    main()
