"""triton_vlm.engine with the tiny moondream2 on CPU: the same tokens as the batched loop (generate_batch), the
bidirectional prefix prefilled in one chunk (over a small budget if need be), the suppressed answer marker."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, parity_fixtures

PROMPTS = ["What is this?", "Describe the colours, the shapes and everything else you can see in the picture.",
           "count 1 2 3", "Is there a cat?"]
#: Image sizes that give one crop grid and a larger tiling (the tiny config: 28-pixel crops, at most 4).
SIZES = [(30, 30), (90, 60), (200, 40), (64, 64)]
MAX_TOKENS = [9, 14, 5, 11]

CASE = ParityCase("moondream2", PROMPTS, SIZES, MAX_TOKENS)
IMAGES = CASE.images
engine = CASE.engine
loaded, reference = parity_fixtures(CASE)


def test_engine_matches_the_batched_loop(loaded: tuple[Any, Any, Any], reference: list[list[int]]) -> None:
    moondream = engine(loaded, max_num_seqs=2)
    assert moondream.min_first_chunk == loaded[1].prefix_length == 17
    assert moondream.generate(CASE.items()) == reference
    assert moondream.cache.free_slots == moondream.cache.num_slots


def test_the_prefix_is_prefilled_in_one_chunk_even_over_the_budget(loaded: tuple[Any, Any, Any],
                                                                   reference: list[list[int]]) -> None:
    moondream = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)  # less than the 17-position prefix
    chunks: list[tuple[str, int, int]] = []
    schedule = moondream.scheduler.schedule

    def recording() -> Any:
        plan = schedule()
        chunks.extend((c.seq.request.request_id, c.start, c.length) for c in plan.prefill)
        if len(plan.prefill) > 1:
            assert sum(c.length for c in plan.prefill) <= 16  # only a chunk alone may exceed the budget
        return plan

    moondream.scheduler.schedule = recording  # type: ignore[method-assign]
    assert moondream.generate(CASE.items()) == reference
    firsts = [length for _, start, length in chunks if start == 0]
    assert len(firsts) == 4 and all(length >= 17 for length in firsts)
    assert any(start > 0 for _, start, _ in chunks)  # the prompts after the prefix were chunked


def test_the_answer_marker_is_never_decoded(loaded: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference masks its answer marker after the first token; the engine's decode steps do too."""
    family, model, processor = loaded
    (marker,) = model.suppressed_decode_ids
    moondream = engine(loaded)
    unmasked = moondream.decoder.logits
    # Make the marker the most likely token everywhere: masked, it still never comes out after the first token.
    monkeypatch.setattr(moondream.decoder, "logits",
                        lambda hidden: unmasked(hidden).index_fill(-1, torch.tensor([marker]), 1e4))
    (tokens,) = moondream.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=6))], ignore_eos=True)
    assert tokens[0] == marker and marker not in tokens[1:] and len(tokens) == 6


def test_the_engine_takes_the_query_task_only(loaded: tuple[Any, Any, Any]) -> None:
    moondream = engine(loaded)
    assert moondream.accepts(None) and moondream.accepts("query")
    assert not any(moondream.accepts(t) for t in ("caption:short", "caption:normal", "detect", "point"))


def test_every_crop_reaches_the_vision_tower_at_the_shape_it_is_graphed_at(loaded: tuple[Any, Any, Any]) -> None:
    """On GPU the engine replays moondream2's ViT as CUDA graphs by crop count: images of every tiling give crops
    of the one shape the adapter names, all go through the tower in one batch, and the projector after it gives
    the batched loop's image features."""
    _, model, _ = loaded
    moondream = engine(loaded)
    shape = moondream.adapter.image_shape(model)
    requests = [moondream.prepare(image, prompt, SamplingParams(max_tokens=1), lambda out: None)
                for image, prompt in zip(IMAGES, PROMPTS, strict=True)]
    crops = [r.mm_inputs["pixel_values"] for r in requests]
    assert {tuple(c.shape[1:]) for c in crops} == {shape} and len({len(c) for c in crops}) > 1
    batches: list[tuple[int, ...]] = []

    def tower(pixels: torch.Tensor) -> torch.Tensor:
        batches.append(tuple(pixels.shape))
        return moondream.adapter.encode_images(model, pixels)

    features = moondream.adapter.image_features(model, requests, tower)
    assert batches == [(sum(len(c) for c in crops), *shape)]
    expected = model.encode_images(torch.cat(crops).to(model.dtype), torch.tensor([len(c) for c in crops]),
                                   torch.tensor([r.mm_inputs["tiling"] for r in requests]))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
