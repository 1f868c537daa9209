"""triton_vlm.bench.parity: where the engine's greedy tokens part from HF generate's, and by how much."""

from __future__ import annotations

import torch

from triton_vlm.bench.parity import Divergence, divergence, hf_greedy_with_logits

from .helpers import load_tiny, noise


def logits(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(row) for row in rows]


def test_equal_tokens_never_part() -> None:
    assert divergence([1, 2, 0], [1, 2, 0], logits([0, 1, 0], [0, 0, 1], [1, 0, 0])) == Divergence(None, 0.0, 3)


def test_the_gap_is_hfs_logit_for_its_token_minus_its_logit_for_ours() -> None:
    found = divergence([1, 0, 2], [1, 2, 0], logits([0, 1, 0], [0.25, 0, 1.0], [1, 0, 0]))
    assert (found.step, found.gap, found.length) == (1, 0.75, 2)


def test_one_stopping_before_the_other_is_a_divergence_of_unbounded_gap() -> None:
    assert divergence([1, 2], [1, 2, 3], logits([0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1])) == Divergence(
        2, float("inf"), 3)


def test_hf_generate_with_logits_matches_the_engine_on_cpu() -> None:
    from triton_vlm.engine import EngineConfig, LLMEngine
    from triton_vlm.sampling import SamplingParams

    family, model, processor = load_tiny("llava")
    image = noise(40, 30, seed=3)
    tokens, scores = hf_greedy_with_logits(family, model, processor, image, "What is this?", 6)
    assert len(tokens) == len(scores) == 6
    # greedy: each its row's best
    assert all(int(row.argmax()) == token for row, token in zip(scores, tokens, strict=True))
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=256))
    (ours,) = engine.generate([(image, "What is this?", SamplingParams(max_tokens=6))])
    assert divergence(ours, tokens, scores) == Divergence(None, 0.0, 6)
