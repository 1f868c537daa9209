"""triton_vlm.engine with the tiny LLaVA-NeXT (anyres tiles, image newline, Mistral with a 24-position sliding
window) on CPU: the same tokens as transformers' ``generate`` one request at a time and as the batched loop,
under continuous batching and chunked prefill; images of different sizes take different numbers of positions in
one run; and the logits after the prompt and after a decode step match the model's own forward, which a wrong
window, newline row or position would move."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from triton_vlm.bench.parity import hf_greedy_with_logits
from triton_vlm.models.llava_next.family import TINY_SLIDING_WINDOW
from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, parity_fixtures

PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi",
           "two people riding bicycles", "count: 0 1 2 3 4 5 6 7 8 9 10 100"]
#: Tiles of 30 px on the grids 2 x 1, 1 x 2, 2 x 2, 3 x 1, 1 x 3: 60 to 135 image positions.
SIZES = [(40, 30), (64, 64), (17, 90), (100, 20), (8, 8)]
MAX_TOKENS = [12, 30, 20, 7, 16]

CASE = ParityCase("llava_next", PROMPTS, SIZES, MAX_TOKENS)
IMAGES = CASE.images
engine = CASE.engine
loaded, reference = parity_fixtures(CASE)


@pytest.fixture(scope="module")
def hf_reference(loaded: tuple[Any, Any, Any]) -> list[list[int]]:
    """transformers' own ``generate``, one request at a time."""
    family, model, processor = loaded
    return [hf_greedy_with_logits(family, model, processor, image, prompt, params.max_tokens)[0]
            for image, prompt, params in CASE.items()]


def prepared(loaded: tuple[Any, Any, Any]) -> list[Any]:
    return [engine(loaded).prepare(image, prompt, params, lambda out: None) for image, prompt, params in CASE.items()]


def test_the_requests_exercise_anyres_and_the_window(loaded: tuple[Any, Any, Any], hf_reference: list) -> None:
    requests = prepared(loaded)
    image_rows = [len(r.mm_inputs["image_rows"]) for r in requests]
    assert len(set(image_rows)) >= 4  # positions per image follow its size
    assert [r.mm_inputs["pixel_values"].shape[1] for r in requests] == [3, 5, 4, 4, 3]  # base + grid tiles
    assert min(len(r.prompt_ids) for r in requests) > 2 * TINY_SLIDING_WINDOW
    assert loaded[1].config.text_config.sliding_window == TINY_SLIDING_WINDOW
    assert engine(loaded).decoder.window == TINY_SLIDING_WINDOW
    assert len({tuple(tokens) for tokens in hf_reference}) == len(PROMPTS) and all(hf_reference)


def test_engine_matches_hf_generate_and_the_batched_loop(loaded: tuple[Any, Any, Any], hf_reference: list,
                                                         reference: list[list[int]]) -> None:
    assert reference == hf_reference  # the served batched path (left-padded, batched) agrees with HF
    one_at_a_time = [engine(loaded, max_num_seqs=1).generate([item])[0] for item in CASE.items()]
    assert one_at_a_time == hf_reference
    batched = engine(loaded, max_num_seqs=3)  # requests join others' decodes
    assert batched.generate(CASE.items()) == hf_reference
    assert batched.cache.free_slots == batched.cache.num_slots


def test_chunked_prefill_across_the_window_changes_nothing(loaded: tuple[Any, Any, Any], hf_reference: list) -> None:
    chunked = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)  # continued chunks whose prefix the window cuts
    starts: list[int] = []
    schedule = chunked.scheduler.schedule

    def recording() -> Any:
        plan = schedule()
        starts.extend(c.start for c in plan.prefill)
        return plan

    chunked.scheduler.schedule = recording  # type: ignore[method-assign]
    assert chunked.generate(CASE.items()) == hf_reference
    assert any(start > TINY_SLIDING_WINDOW for start in starts)


def test_without_the_window_the_tokens_differ(loaded: tuple[Any, Any, Any], hf_reference: list) -> None:
    unwindowed = engine(loaded, max_num_seqs=2)
    unwindowed.decoder.window = None  # as a decoder that ignored Mistral's config would run
    assert unwindowed.generate(CASE.items()) != hf_reference


def engine_logits(loaded: tuple[Any, Any, Any], index: int, window: int | None = TINY_SLIDING_WINDOW,
                  newline: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The engine decoder's logits after request ``index``'s prompt and after one decode step of ``token``
    (the prompt's greedy token): (prompt logits, step logits, token)."""
    from triton_vlm.engine.kv_cache import SlotKVCache

    family, model, processor = loaded
    llava_next = engine(loaded)
    decoder = llava_next.decoder
    decoder.window = window
    request = llava_next.prepare(IMAGES[index], PROMPTS[index], SamplingParams(max_tokens=1), lambda out: None)
    saved = model.model.image_newline.data.clone()
    if not newline:
        model.model.image_newline.data.zero_()
    try:
        with torch.inference_mode():
            (embeds,) = llava_next.adapter.prompt_embeds(model, decoder, [request], llava_next.runner.encode_images)
    finally:
        model.model.image_newline.data.copy_(saved)
    cache = SlotKVCache(decoder.num_layers, 1, decoder.num_kv_heads, decoder.head_dim, 256, model.dtype,
                        torch.device("cpu"))
    n = len(request.prompt_ids)
    with torch.inference_mode():
        prompt_logits = decoder.logits(decoder.prefill(embeds, [(0, 0, n)], cache))[0]
        token = int(prompt_logits.argmax())
        step_logits = decoder.decode(torch.tensor([token]), torch.tensor([n]), torch.tensor([n + 1]), cache)[0]
    return prompt_logits, step_logits, token


def hf_logits(loaded: tuple[Any, Any, Any], index: int, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    family, model, processor = loaded
    inputs = processor(images=[IMAGES[index]], text=[family.render_prompt(processor, PROMPTS[index])],
                       return_tensors="pt")
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        logits = model(**inputs).logits[0]
    return logits[-2], logits[-1]


@pytest.mark.parametrize("index", [1, 2])
def test_prompt_and_step_logits_match_the_model_and_move_when_a_piece_is_wrong(loaded: tuple[Any, Any, Any],
                                                                               index: int) -> None:
    prompt_logits, step_logits, token = engine_logits(loaded, index)
    expected_prompt, expected_step = hf_logits(loaded, index, token)
    torch.testing.assert_close(prompt_logits, expected_prompt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits, expected_step, atol=1e-4, rtol=1e-4)
    # Each fault moves the logits far past that tolerance: a window one position short or long, no window, and
    # image newlines left out of the packed features.
    for fault in ({"window": TINY_SLIDING_WINDOW - 1}, {"window": TINY_SLIDING_WINDOW + 1}, {"window": None},
                  {"newline": False}):
        wrong_prompt, wrong_step, _ = engine_logits(loaded, index, **fault)  # type: ignore[arg-type]
        assert (wrong_prompt - expected_prompt).abs().max() > 1e-3 or (wrong_step - expected_step).abs().max() > 1e-3, fault
