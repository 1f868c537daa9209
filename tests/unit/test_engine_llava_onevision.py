"""triton_vlm.engine with the tiny LLaVA-OneVision (SigLIP over 32 px anyres tiles, unpadding, the ``anyres_max_4``
shrink, image newlines, Qwen2 with q/k/v biases) on CPU: the same tokens as transformers' ``generate`` one request
at a time and as the batched loop, under continuous batching and chunked prefill, with images of different sizes
(different grids, some shrunk) in one run and several images in one request (each its whole view). And the checks
have teeth: the prompt and step logits match the model's own forward and move far when the newline row, the
unpadding or the biases are wrong."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from triton_vlm.chat import parse_messages
from triton_vlm.models.llava_onevision.family import TINY, TINY_TILE
from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, chunk_starts_inside_images, noise, parity_fixtures

PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi",
           "two people riding bicycles", "count: 0 1 2 3 4 5 6 7 8 9 10 100"]
#: On the tiny grids (1 to 3 tiles of 32 px a side): 1 x 2, 2 x 2, 3 x 1, 3 x 3 (shrunk to 4 tiles' worth) and
#: 1 x 1 tiles, plus the base view.
SIZES = [(40, 30), (64, 64), (17, 90), (100, 90), (8, 8)]
MAX_TOKENS = [12, 30, 20, 7, 16]

CASE = ParityCase("llava_onevision", PROMPTS, SIZES, MAX_TOKENS)
IMAGES = CASE.images
engine = CASE.engine
loaded, reference = parity_fixtures(CASE)
Loaded = tuple[Any, Any, Any]


def hf_generate(loaded: Loaded, images: list[Any], text: str, max_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` on the processor's own outputs for one request, up to its stop token."""
    family, model, processor = loaded
    inputs = processor(images=[images], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = family.stop_token_ids(model, processor)
    return next((tokens[:i] for i, token in enumerate(tokens) if token in stops), tokens)


@pytest.fixture(scope="module")
def hf_reference(loaded: Loaded) -> list[list[int]]:
    """transformers' own ``generate``, one request at a time."""
    family, _model, processor = loaded
    return [hf_generate(loaded, [image], family.render_prompt(processor, prompt), params.max_tokens)
            for image, prompt, params in CASE.items()]


def prepared(loaded: Loaded) -> list[Any]:
    return [engine(loaded).prepare(image, prompt, params, lambda out: None) for image, prompt, params in CASE.items()]


def shrunk(model: Any, image_size: tuple[int, int], tiles: int) -> bool:
    """Whether OneVision's packing shrinks this image's features (more than ``anyres_max_N`` tiles' worth)."""
    side = TINY_TILE // TINY.vision["patch_size"]
    limit = int(model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
    return math.sqrt((tiles - 1) * side * side / (limit * side * side)) > 1.1


def test_the_requests_exercise_anyres_the_shrink_and_the_biases(loaded: Loaded, hf_reference: list) -> None:
    _family, model, _processor = loaded
    requests = prepared(loaded)
    tiles = [r.mm_inputs["pixel_values"].shape[1] for r in requests]
    assert tiles == [3, 5, 4, 10, 2]  # base + grid tiles
    assert len({len(r.mm_inputs["image_rows"]) for r in requests}) == len(requests)  # positions follow the size
    assert [shrunk(model, size, count) for size, count in zip(SIZES, tiles, strict=True)] == [False] * 3 + [True, False]
    assert engine(loaded).decoder.layers[0].qkv_bias is not None
    assert float(engine(loaded).decoder.layers[0].qkv_bias.abs().mean()) > 0.05  # not transformers' zeros
    assert len({tuple(tokens) for tokens in hf_reference}) == len(PROMPTS) and all(hf_reference)


def test_engine_matches_hf_generate_and_the_batched_loop(loaded: Loaded, hf_reference: list,
                                                         reference: list[list[int]]) -> None:
    assert reference == hf_reference  # the served batched path (left-padded, batched) agrees with HF
    one_at_a_time = [engine(loaded, max_num_seqs=1).generate([item])[0] for item in CASE.items()]
    assert one_at_a_time == hf_reference
    batched = engine(loaded, max_num_seqs=3)  # requests join others' decodes
    assert batched.generate(CASE.items()) == hf_reference
    assert batched.cache.free_slots == batched.cache.num_slots


def test_chunks_that_split_an_image_change_nothing(loaded: Loaded, hf_reference: list) -> None:
    chunked = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)
    inside = chunk_starts_inside_images(chunked)
    assert chunked.generate(CASE.items()) == hf_reference
    assert any(inside)


def test_the_biases_count(loaded: Loaded, hf_reference: list) -> None:
    unbiased = engine(loaded, max_num_seqs=4)
    for layer in unbiased.decoder.layers:
        assert layer.qkv_bias is not None
        layer.qkv_bias = torch.zeros_like(layer.qkv_bias)
    assert unbiased.generate(CASE.items()) != hf_reference


def test_several_images_are_each_one_whole_view(loaded: Loaded) -> None:
    """A request of two images: each is its base view alone (one tile and a newline, OneVision's multi-image
    packing), and the tokens are transformers' for the same request, alone and beside single-image requests."""
    family, _model, processor = loaded
    images = [noise(100, 40, 7), noise(30, 64, 8)]
    chat = parse_messages(json.dumps([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]}]), 2)
    text = family.render_chat(processor, chat)
    assert text == "<|im_start|>user <image><image>\nCompare them.<|im_end|><|im_start|>assistant\n"
    two = engine(loaded).prepare(images, chat, SamplingParams(max_tokens=12), lambda out: None)
    side = TINY_TILE // TINY.vision["patch_size"]
    assert two.mm_inputs["pixel_values"].shape[:2] == (2, 1)
    assert len(two.mm_inputs["image_rows"]) == 2 * (side * side + 1)
    expected = hf_generate(loaded, images, text, 12)
    assert expected
    assert engine(loaded).generate([(images, chat, SamplingParams(max_tokens=12))]) == [expected]
    mixed = engine(loaded, max_num_seqs=2).generate([*CASE.items()[:2], (images, chat, SamplingParams(max_tokens=12))])
    assert mixed[2] == expected


@contextmanager
def faulty(model: Any, fault: str) -> Iterator[None]:
    """The model's packing with one piece wrong: ``newline`` (zero newline rows), ``unpadding`` (the kept rows or
    columns taken from the top/left edge instead of the middle: as many features, the wrong ones)."""
    from transformers.models.llava_onevision import modeling_llava_onevision as modeling

    saved_newline, saved_unpad = model.model.image_newline.data.clone(), modeling.unpad_image

    def uncentered(tensor: torch.Tensor, original_size: Any) -> torch.Tensor:
        kept = saved_unpad(tensor, original_size)
        return tensor[:, :kept.shape[1], :kept.shape[2]]

    if fault == "newline":
        model.model.image_newline.data.zero_()
    elif fault == "unpadding":
        modeling.unpad_image = uncentered
    try:
        yield
    finally:
        model.model.image_newline.data.copy_(saved_newline)
        modeling.unpad_image = saved_unpad


def engine_logits(loaded: Loaded, index: int, fault: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The engine decoder's logits after request ``index``'s prompt and after one decode step of ``token`` (the
    prompt's greedy token): (prompt logits, step logits, token)."""
    from triton_vlm.engine.kv_cache import SlotKVCache

    _family, model, _processor = loaded
    onevision = engine(loaded)
    decoder = onevision.decoder
    request = onevision.prepare(IMAGES[index], PROMPTS[index], SamplingParams(max_tokens=1), lambda out: None)
    if fault == "bias":
        for layer in decoder.layers:
            layer.qkv_bias = None
    with faulty(model, fault or ""), torch.inference_mode():
        (embeds,) = onevision.adapter.prompt_embeds(model, decoder, [request], onevision.runner.encode_images)
    cache = SlotKVCache(decoder.num_layers, 1, decoder.num_kv_heads, decoder.head_dim, 256, model.dtype,
                        torch.device("cpu"))
    n = len(request.prompt_ids)
    with torch.inference_mode():
        prompt_logits = decoder.logits(decoder.prefill(embeds, [(0, 0, n)], cache))[0]
        token = int(prompt_logits.argmax())
        step_logits = decoder.decode(torch.tensor([token]), torch.tensor([n]), torch.tensor([n + 1]), cache)[0]
    return prompt_logits, step_logits, token


def hf_logits(loaded: Loaded, index: int, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    family, model, processor = loaded
    inputs = processor(images=[IMAGES[index]], text=[family.render_prompt(processor, PROMPTS[index])],
                       return_tensors="pt")
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        logits = model(**inputs).logits[0]
    return logits[-2], logits[-1]


@pytest.mark.parametrize("index", [0, 3])  # padded top and bottom (1 x 2); shrunk (3 x 3)
def test_prompt_and_step_logits_match_the_model_and_move_when_a_piece_is_wrong(loaded: Loaded, index: int) -> None:
    prompt_logits, step_logits, token = engine_logits(loaded, index)
    expected_prompt, expected_step = hf_logits(loaded, index, token)
    torch.testing.assert_close(prompt_logits, expected_prompt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits, expected_step, atol=1e-4, rtol=1e-4)
    for fault in ("newline", "unpadding", "bias"):
        wrong_prompt, wrong_step, _ = engine_logits(loaded, index, fault)
        assert (wrong_prompt - expected_prompt).abs().max() > 1e-3 or (wrong_step - expected_step).abs().max() > 1e-3, fault
