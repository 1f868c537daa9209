"""Qwen2-VL and Qwen2.5-VL on triton-vlm's engine (tiny weights, CPU): greedy tokens equal transformers' ``generate``,
one request and several of different image sizes under continuous batching and chunked prefill; and the checks
have teeth: without the q/k/v biases, the rope delta, or the 3-D positions, the tokens differ."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.engine.adapter import positioned
from triton_vlm.models import get_family
from triton_vlm.sampling import SamplingParams
from triton_vlm.tiny import ensure_tiny_checkpoint

from .helpers import chunk_starts_inside_images, noise

PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat. Describe it in detail.", "hi", "count 1 2 3"]
#: Image sizes that give different grids (and so prompt lengths): 6x8, 6x2, 4x4 and 2x12 patches.
SIZES = [(64, 48), (20, 50), (33, 33), (90, 20)]
MAX_TOKENS = [12, 7, 15, 10]
IMAGES = [noise(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
Loaded = tuple[Any, Any, Any]


def load(model_type: str) -> Loaded:
    family = get_family("qwen2_vl")
    variant = family.tiny_variant("Qwen/Qwen2.5-VL-7B-Instruct" if model_type == "qwen2_5_vl"
                                  else family.default_hf_model_id)
    model, processor = family.load(str(ensure_tiny_checkpoint("qwen2_vl", variant=variant)), revision=None,
                                   dtype=torch.float32, device=torch.device("cpu"), local_files_only=True,
                                   trust_remote_code=False)
    assert model.config.model_type == model_type
    return family, model, processor


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return load(request.param)


def hf_generate(loaded: Loaded, index: int) -> list[int]:
    """transformers' greedy ``generate`` for request ``index`` alone, up to (not including) EOS."""
    family, model, processor = loaded
    inputs = family.encode(processor, [IMAGES[index]], [family.render_prompt(processor, PROMPTS[index])])
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS[index])
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = family.stop_token_ids(model, processor)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


@pytest.fixture(scope="module")
def reference(loaded: Loaded) -> list[list[int]]:
    return [hf_generate(loaded, i) for i in range(len(PROMPTS))]


def engine(loaded: Loaded, **config: Any) -> LLMEngine:
    return LLMEngine(*loaded, EngineConfig(**{"max_model_len": 256, **config}))


def items(indices: list[int] | None = None) -> list[tuple[Any, str, SamplingParams]]:
    return [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i]))
            for i in (range(len(PROMPTS)) if indices is None else indices)]


def test_reference_is_worth_matching(loaded: Loaded, reference: list[list[int]]) -> None:
    assert sum(len(t) for t in reference) > 30 and len({tuple(t) for t in reference}) == len(reference)
    family, _model, processor = loaded
    lengths = {len(family.encode(processor, [image], [family.render_prompt(processor, "hi")])["input_ids"][0])
               for image in IMAGES}
    assert len(lengths) == len(IMAGES)  # dynamic resolution: every image its own number of tokens


def test_one_request_matches_transformers_generate(loaded: Loaded, reference: list[list[int]]) -> None:
    qwen = engine(loaded)
    assert qwen.runner.rope_offsets is not None and qwen.decoder.layers[0].qkv_bias is not None
    assert qwen.generate(items([0])) == reference[:1]


def test_the_rotary_always_gets_three_rows_of_positions(loaded: Loaded, reference: list[list[int]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.17 (the GPU host's) indexes Qwen2-VL's rotary positions as [3, batch, positions] and fails on
    the [1, tokens] that newer releases expand themselves: decode steps hand over one row, which must become three."""
    qwen = engine(loaded, max_num_seqs=2)
    rotary = type(qwen.decoder.rotary)
    forward = rotary.forward

    def strict(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        assert position_ids.dim() == 3 and position_ids.shape[0] == 3, tuple(position_ids.shape)
        return forward(self, x, position_ids)

    monkeypatch.setattr(rotary, "forward", strict)
    assert qwen.generate(items([0, 1])) == reference[:2]


def test_batched_requests_of_different_sizes_match_transformers_generate(loaded: Loaded,
                                                                         reference: list[list[int]]) -> None:
    """Two slots for four requests: requests join while others decode, prompt chunks ride along in decode steps."""
    qwen = engine(loaded, max_num_seqs=2)
    assert qwen.runner.mixes
    assert qwen.generate(items()) == reference
    assert qwen.cache.free_slots == qwen.cache.num_slots


def test_chunks_that_split_an_image_change_nothing(loaded: Loaded, reference: list[list[int]]) -> None:
    qwen = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)
    inside = chunk_starts_inside_images(qwen)
    assert qwen.generate(items()) == reference
    assert any(inside)


def test_the_biases_count(loaded: Loaded, reference: list[list[int]]) -> None:
    qwen = engine(loaded, max_num_seqs=4)
    for layer in qwen.decoder.layers:
        assert layer.qkv_bias is not None
        layer.qkv_bias = torch.zeros_like(layer.qkv_bias)
    assert qwen.generate(items()) != reference


@pytest.mark.parametrize("wrong", ["no rope delta", "1-D positions"])
def test_the_positions_count(loaded: Loaded, reference: list[list[int]], wrong: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    qwen = engine(loaded, max_num_seqs=4)
    own = qwen.adapter.rope_positions

    def altered(model: Any, prompt_ids: list[int], mm_inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        rope = own(model, prompt_ids, mm_inputs)
        assert rope is not None
        positions, delta = rope
        assert delta <= 0 and positions.shape == (3, len(prompt_ids))  # an image's tokens share positions
        if wrong == "no rope delta":
            return positions, 0
        return torch.arange(len(prompt_ids)).expand(3, -1), 0  # cache positions: no 3-D grid, no delta

    monkeypatch.setattr(qwen.adapter, "rope_positions", altered)
    assert qwen.generate(items()) != reference


def first_logits(qwen: LLMEngine) -> torch.Tensor:
    """The logits after each prompt's prefill [prompts, vocab], at the prompts' own 3-D positions."""
    requests = [qwen.prepare(image, prompt, SamplingParams(max_tokens=1), lambda out: None)
                for image, prompt in zip(IMAGES, PROMPTS, strict=True)]
    embeds = qwen.adapter.prompt_embeds(qwen.model, qwen.decoder, requests, qwen.runner.encode_images)
    chunks = [(slot, 0, len(r.prompt_ids)) for slot, r in enumerate(requests)]
    positions = torch.cat([r.prompt_positions for r in requests if r.prompt_positions is not None], dim=-1)
    with torch.inference_mode():
        return qwen.decoder.logits(qwen.decoder.prefill(torch.cat(embeds), chunks, qwen.cache, positions))


def test_fp8_projections_keep_the_biases(loaded: Loaded) -> None:
    """fp8 weights, the bias added after the matmul: close to the dense engine, far from a bias-less fp8 one."""
    import torch.nn.functional as F

    from triton_vlm.engine.quantization import Fp8Weight

    dense = first_logits(engine(loaded, max_num_seqs=4))
    fp8 = engine(load(loaded[1].config.model_type), max_num_seqs=4, quantization="fp8")  # quantizing frees weights
    assert isinstance(fp8.decoder.layers[0].qkv, Fp8Weight)
    assert F.cosine_similarity(first_logits(fp8), dense, dim=-1).min() > 0.98  # 5x-spread weights: coarser fp8
    for layer in fp8.decoder.layers:
        assert layer.qkv_bias is not None
        layer.qkv_bias = torch.zeros_like(layer.qkv_bias)
    assert F.cosine_similarity(first_logits(fp8), dense, dim=-1).min() < 0.95


def test_plain_models_pay_nothing_for_positions(llava_runtime: Any) -> None:
    loaded = llava_runtime.ensure_loaded()
    llava = LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(max_model_len=256))
    assert llava.runner.rope_offsets is None and not positioned(llava.decoder)
    request = llava.prepare(IMAGES[0], "hi", SamplingParams(max_tokens=2), lambda out: None)
    assert request.prompt_positions is None and request.rope_delta == 0
