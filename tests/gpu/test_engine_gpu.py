"""triton_vlm.engine on a CUDA device (fused kernels, CUDA graphs, chunked prefill, continuous batching) gives
the batched loop's greedy tokens on the same GPU, exactly, for every engine family's tiny model in float32; in
float16 it follows HF ``generate`` up to near-ties, for the tiny models and for llava-1.5-7b's full architecture."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit import test_engine as llava_cpu
from tests.unit import test_engine_kosmos2 as kosmos2_cpu
from tests.unit import test_engine_llava_next as llava_next_cpu
from tests.unit import test_engine_llava_onevision as llava_onevision_cpu
from tests.unit import test_engine_moondream2 as moondream2_cpu
from tests.unit import test_engine_qwen2_vl as qwen2_vl_cpu
from tests.unit import test_engine_smolvlm as smolvlm_cpu
from tests.unit.helpers import ParityCase

from triton_vlm.bench.parity import divergence, hf_greedy_with_logits
from triton_vlm.engine.vision import GraphedVision

#: The CPU parity tests' requests: prompt lengths, image sizes and max_tokens all differ.
CASES = {"llava": ParityCase("llava", llava_cpu.PROMPTS, llava_cpu.SIZES, llava_cpu.MAX_TOKENS),
         "kosmos2": kosmos2_cpu.CASE, "moondream2": moondream2_cpu.CASE, "llava_next": llava_next_cpu.CASE,
         "llava_onevision": llava_onevision_cpu.CASE, "smolvlm": smolvlm_cpu.CASE,
         "qwen2_vl": ParityCase("qwen2_vl", qwen2_vl_cpu.PROMPTS, qwen2_vl_cpu.SIZES, qwen2_vl_cpu.MAX_TOKENS)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[ParityCase, Any, list[list[int]]]:
    parity = CASES[request.param]
    loaded = parity.load("cuda")
    return parity, loaded, parity.reference(loaded)


def test_engine_on_cuda_matches_the_batched_loop(case: tuple[ParityCase, Any, list[list[int]]]) -> None:
    parity, loaded, reference = case
    assert any(reference), "the reference must generate something worth matching"
    # Two at a time and 16 prompt tokens a step: requests join running decodes and prompts take several chunks.
    engine = parity.engine(loaded, max_num_seqs=2, max_prefill_tokens=16)
    assert engine.runner.use_graphs
    assert engine.generate(parity.items()) == reference
    assert engine.runner._graphs, "decode steps replayed CUDA graphs"  # noqa: SLF001 (what the test is about)
    # Every tower whose pixels come in one shape (moondream2's crops, SmolVLM's tiles too) is replayed; Qwen2-VL's
    # images keep their own sizes and run eagerly.
    vision = engine.runner.encode_images
    if engine.runner.adapter.image_shape(engine.runner.model) is None:
        assert not isinstance(vision, GraphedVision)
    else:
        assert isinstance(vision, GraphedVision) and vision._graphs and not vision.eager  # noqa: SLF001
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()


def test_prefix_cache_and_n_choices_on_cuda_keep_the_tokens(case: tuple[ParityCase, Any, list[list[int]]]) -> None:
    """The same requests again on one engine start from their cached prefixes (idle slots taken over, K/V copied
    on the device, vision skipped), and three greedy choices of one request share its prefill: the same tokens."""
    from triton_vlm.sampling import SamplingParams

    parity, loaded, reference = case
    engine = parity.engine(loaded, max_num_seqs=4, max_prefill_tokens=16)
    assert engine.generate(parity.items()) == reference
    assert engine.generate(parity.items()) == reference
    assert engine.stats.prefix_hits >= 1 and engine.stats.prefix_cached_tokens > 0
    image, prompt, params = parity.items()[1]
    three = SamplingParams(max_tokens=params.max_tokens, n=3)
    assert engine.generate([(image, prompt, three)]) == [reference[1]] * 3
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()


@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_onevision", "smolvlm"])
def test_prefill_rows_on_cuda_keep_the_tokens(name: str) -> None:
    """Short text chunks as graphed decode rows of their slot (``prefill_rows_max``: the slotted decode kernel,
    the rows' own graphs), prompts in chunks of 16 and a second round one request at a time from the prefix
    cache: the batched loop's tokens."""
    parity = CASES[name]
    loaded = parity.load("cuda")
    reference = parity.reference(loaded)
    engine = parity.engine(loaded, max_num_seqs=2, max_prefill_tokens=16, prefill_rows_max=16)
    assert engine.generate(parity.items()) == reference
    assert [engine.generate([item])[0] for item in parity.items()] == reference
    assert engine.stats.row_prefills > 0 and engine.runner._row_graphs  # noqa: SLF001 (what the test is about)


#: The tiny models' logits are ~0.5 in size, where float16 steps are 2.4e-4 (and their top two can be 1e-3 apart):
#: the engine's kernels and HF's may order two nearly equal logits differently. A real fault (a wrong position, head
#: or cache slot) moves logits by ~0.1 or more.
NEAR_TIE = 5e-3


@pytest.mark.parametrize("name", ["llava", "kosmos2", "llava_next", "llava_onevision"])  # moondream2 is native: no HF generate to compare with
def test_float16_engine_follows_hf_generate_up_to_near_ties(name: str) -> None:
    import torch

    parity = CASES[name]
    loaded = parity.load("cuda", torch.float16)
    engine = parity.engine(loaded, max_num_seqs=2, max_prefill_tokens=16)
    compared = 0
    family, model, processor = loaded
    for (image, prompt, params), ours in zip(parity.items(), engine.generate(parity.items()), strict=True):
        found = divergence(ours, *hf_greedy_with_logits(family, model, processor, image, prompt, params.max_tokens))
        # Where the two part, HF rated the engine's token all but as high as its own.
        assert 0 <= found.gap < NEAR_TIE, f"{name}: token {found.step} differs from HF's by {found.gap:.4f}"
        compared += found.length
    assert compared >= sum(params.max_tokens for _, _, params in parity.items()) // 2


#: How far apart, in float16 steps at the size of its top logit, HF's logits for its own token and the engine's may
#: lie where llava-1.5-7b's two part. On the H100 they parted 0, 3 and 2 steps apart in three of four requests
#: (bench/results/h100-llava-parity.json), where HF's top two usually lie 40-70 steps apart.
NEAR_TIE_STEPS = 8


def test_llava_7b_engine_follows_hf_generate_up_to_near_ties() -> None:
    """llava-1.5-7b's architecture with random fp16 weights, the engine's fused kernels at full width: four
    requests of 64 tokens, greedy, against HF ``generate`` on the same weights. Random weights put near-ties
    everywhere, so the two may part; each parting must be one."""
    import gc
    import math

    import torch

    from triton_vlm.bench.checkpoints import random_llava_7b
    from triton_vlm.bench.inprocess import probe_inputs
    from triton_vlm.engine import EngineConfig, LLMEngine
    from triton_vlm.models import get_family
    from triton_vlm.sampling import SamplingParams

    torch.manual_seed(0)
    family = get_family("llava")
    model, processor = random_llava_7b(torch.device("cuda"))
    images, prompts = probe_inputs(4)
    params = SamplingParams(max_tokens=64)
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=768, max_num_seqs=4))
    try:
        ours = engine.generate([(image, prompt, params) for image, prompt in zip(images, prompts, strict=True)])
        for index, (image, prompt, tokens) in enumerate(zip(images, prompts, ours, strict=True)):
            theirs, logits = hf_greedy_with_logits(family, model, processor, image, prompt, params.max_tokens)
            found = divergence(tokens, theirs, logits)
            top = max(abs(float(row.max())) for row in logits[:found.length])
            step = torch.finfo(torch.float16).eps * 2.0 ** math.floor(math.log2(top))
            assert 0 <= found.gap <= NEAR_TIE_STEPS * step, (
                f"request {index}: token {found.step} differs from HF's by {found.gap:.4f} ({found.gap / step:.1f} "
                f"float16 steps)")
    finally:
        engine.shutdown()
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
