"""triton_vlm.engine with the tiny Kosmos-2 on CPU: the same tokens as the batched loop (HF's forward), chunked
prefill included (chunks that split the image's latents), and the image actually in the prompt."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, noise, parity_fixtures

PROMPTS = ["<grounding>An image of", "What is this?", "hi", "<grounding> Describe this image in detail:"]
SIZES = [(40, 30), (50, 30), (30, 90), (64, 64)]
MAX_TOKENS = [10, 7, 15, 12]

CASE = ParityCase("kosmos2", PROMPTS, SIZES, MAX_TOKENS)
IMAGES = CASE.images
engine = CASE.engine
loaded, reference = parity_fixtures(CASE)


def test_reference_is_worth_matching(reference: list[list[int]]) -> None:
    assert sum(len(tokens) for tokens in reference) > 20  # not every row stopped at once
    assert len({tuple(tokens) for tokens in reference}) > 1


def test_engine_matches_the_batched_loop(loaded: tuple[Any, Any, Any], reference: list[list[int]]) -> None:
    kosmos = engine(loaded, max_num_seqs=2)  # requests join as others finish
    assert kosmos.generate(CASE.items()) == reference
    assert kosmos.cache.free_slots == kosmos.cache.num_slots


def test_chunks_that_split_the_image_latents_change_nothing(loaded: tuple[Any, Any, Any],
                                                             reference: list[list[int]]) -> None:
    kosmos = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)  # the 64 latents span several chunks
    starts: list[int] = []
    schedule = kosmos.scheduler.schedule

    def recording() -> Any:
        plan = schedule()
        starts.extend(c.start for c in plan.prefill)
        return plan

    kosmos.scheduler.schedule = recording  # type: ignore[method-assign]
    assert kosmos.generate(CASE.items()) == reference
    assert any(0 < start < 64 for start in starts)


def test_the_image_reaches_the_decoder(loaded: tuple[Any, Any, Any]) -> None:
    """The latents replace their placeholders: another image gives other prompt embeddings (and the reference
    agrees on what it then generates)."""
    family, model, processor = loaded
    kosmos = engine(loaded)
    first, other = (kosmos.prepare(image, PROMPTS[0], SamplingParams(max_tokens=4), lambda out: None)
                    for image in (IMAGES[0], noise(40, 30, seed=99)))
    assert first.prompt_ids == other.prompt_ids and len(first.mm_inputs["image_rows"]) == 64
    embeds = kosmos.adapter.prompt_embeds(model, kosmos.decoder, [first, other], kosmos.runner.encode_images)
    rows = first.mm_inputs["image_rows"]
    assert not torch.allclose(embeds[0][rows], embeds[1][rows])
    text_rows = [i for i in range(len(first.prompt_ids)) if i not in set(rows)]
    assert torch.equal(embeds[0][text_rows], embeds[1][text_rows])
