"""``engine.prepare`` from several threads at once (the stream model's prepare workers, ``prepare_workers``): each
family's processor, tokenizer and chat rendering give every request what they give it one request at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, load_tiny, noise

FAMILIES = ["llava", "llava_next", "llava_onevision", "kosmos2", "moondream2", "qwen2_vl", "smolvlm"]
SIZES = [(30, 20), (64, 48), (20, 41), (96, 96), (33, 17), (50, 80)]
PROMPTS = ["What is this?", "Describe the picture in detail.", "Colors?", "Is there a house?", "Count them.", "Why?"]


def same(left: Any, right: Any) -> bool:
    if isinstance(left, torch.Tensor):
        return isinstance(right, torch.Tensor) and left.shape == right.shape and bool(torch.equal(left, right))
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_prepared_by_four_threads_equal_those_prepared_one_at_a_time(family: str) -> None:
    # No cache of processed images: every request runs its processor, the part that must be safe to share.
    engine = ParityCase.engine(load_tiny(family), max_model_len=2048, image_cache_mb=0)
    images = [noise(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    params = SamplingParams(max_tokens=4)

    def prepare(i: int) -> tuple[list[int], dict[str, Any]]:
        request = engine.prepare(images[i % len(images)], PROMPTS[i % len(PROMPTS)], params, None)
        return request.prompt_ids, request.mm_inputs

    alone = [prepare(i) for i in range(len(SIZES))]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(prepare, range(6 * len(SIZES))))
    assert len({len(ids) for ids, _ in alone}) > 1  # the requests differ: a mix-up would show
    for i, (ids, inputs) in enumerate(together):
        want_ids, want_inputs = alone[i % len(SIZES)]
        assert ids == want_ids, f"request {i}: prompt ids differ"
        assert same(inputs, want_inputs), f"request {i}: multimodal inputs differ"
