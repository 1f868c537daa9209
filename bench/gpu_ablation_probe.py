"""GPU probe: one engine model at c64 in-process with parts of the engine switched back, to see what each is worth.

python -m bench.gpu_ablation_probe --model moondream2|kosmos2|llava

Variants: the engine as it is; prefill per chunk (K/V stored with per-chunk copies instead of one kernel a layer,
and, for causal decoders, an SDPA call per chunk instead of one variable-length flash call); decode attention
with the earlier tiles (128 positions a split, 64 a loop, 4 warps) or with 256-position splits (the tiles before
512); decode attention with the wide tiles at every batch (no short splits for few rows); the vision tower run
eagerly instead of as CUDA graphs; CLIP's quick_gelu in three torch passes instead of one kernel. Same weights
and requests for all; b1 and c64 tok/s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from collections.abc import Iterator
from unittest import mock

import torch

from bench.gpu_engine_probe import engine_run, load, probe_inputs
from bench.gpu_engine_profile import GpuTimeline
from triton_vlm.engine import EngineConfig, LLMEngine, attention, kernels


@contextlib.contextmanager
def per_chunk_prefill_stores() -> Iterator[None]:
    original = attention.prefill_attention

    def without_fused_stores(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["fused"] = False
        return original(*args[:4], **kwargs)
    with contextlib.ExitStack() as stack:
        for name in ("llama", "kosmos2", "moondream"):  # each decoder imported the function by name
            module = importlib.import_module(f"triton_vlm.engine.{name}")
            stack.enter_context(mock.patch.object(module, "prefill_attention", without_fused_stores))
        yield


@contextlib.contextmanager
def eager_vision() -> Iterator[None]:
    """The vision tower run eagerly, not replayed as CUDA graphs (moondream2's, before its crops were graphed)."""
    from triton_vlm.models import get_family

    with contextlib.ExitStack() as stack:
        for name in ("llava", "kosmos2", "moondream2"):
            adapter = type(get_family(name).engine_adapter())
            stack.enter_context(mock.patch.object(adapter, "image_shape", lambda self, model: None))
        yield


VARIANTS = {"current": contextlib.nullcontext, "per_chunk_prefill_stores": per_chunk_prefill_stores,
            "eager_vision": eager_vision,
            # CLIP towers' activation as transformers runs it (three passes), though still swapped in by the engine
            "unfused_quick_gelu": lambda: mock.patch.object(kernels, "quick_gelu", kernels.quick_gelu_torch),
            "earlier_attention_tiles": lambda: mock.patch.object(kernels, "ATTENTION_TILES_WIDE",
                                                                 kernels.AttentionTiles(128, 64, 4)),
            "split_256_attention_tiles": lambda: mock.patch.object(kernels, "ATTENTION_TILES_WIDE",
                                                                   kernels.AttentionTiles(256, 32, 2)),
            "wide_attention_tiles_always": lambda: mock.patch.object(kernels, "WIDE_ATTENTION_FROM", 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["llava", "moondream2", "kosmos2"], default="moondream2")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which, comma-separated")
    args = parser.parse_args()
    from triton_vlm.engine.attention import avoid_per_shape_attention_plans

    avoid_per_shape_attention_plans(torch.device("cuda"))
    family, model, processor = load(args.model, tiny=False)
    images, prompts = probe_inputs()
    results = []
    chosen = [(name, VARIANTS[name]) for name in args.variants.split(",")]
    for name, variant in [*chosen, ("current again", contextlib.nullcontext)]:
        with variant():
            engine = LLMEngine(family, model, processor, EngineConfig(
                max_model_len=1024 if args.model == "moondream2" else 768, max_num_seqs=64))
            engine.runner.warmup()
            engine.start()
            engine_run(engine, images, prompts, 64, 64)  # warm-up
            timeline = GpuTimeline(engine.runner)
            c64 = engine_run(engine, images, prompts, 64, 192)
            device = timeline.report(c64["seconds"])
            b1 = engine_run(engine, images, prompts, 1, 8)
            row = {"variant": name, "b1_tok_s": b1["output_tok_s"], "c64_tok_s": c64["output_tok_s"], "device": device}
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "gpu": torch.cuda.get_device_name(0), "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
