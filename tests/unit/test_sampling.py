"""triton_vlm.sampling: parameter validation and per-row token choice."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from triton_vlm.errors import InvalidInputError
from triton_vlm.sampling import (
    MAX_SEED,
    MIN_TEMPERATURE,
    RowSampler,
    SamplingParams,
    _top_p_filter,
    choose_tokens,
    make_generator,
)

CPU = torch.device("cpu")


# -- SamplingParams ------------------------------------------------------------------------------------------
def test_defaults_are_greedy() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.greedy) == (128, 0.0, 1.0, None, True)
    assert SamplingParams(temperature=0.7).greedy is False


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"max_tokens": -5}, "max_tokens must be >= 1"),
    ({"temperature": -0.1}, "temperature must be in [0, 100], got -0.1"),
    ({"temperature": 100.5}, "temperature must be in [0, 100]"),
    ({"temperature": math.nan}, "temperature must be in [0, 100], got nan"),
    ({"temperature": math.inf}, "temperature must be in [0, 100], got inf"),
    ({"temperature": -math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": -0.5}, "top_p must be in (0, 1]"),
    ({"top_p": 1.0001}, "top_p must be in (0, 1]"),
    ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
    ({"seed": -1}, "seed must be in [0, 2**63-1], got -1"),
    ({"seed": MAX_SEED + 1}, "seed must be in [0, 2**63-1]"),
])
def test_invalid_params(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert info.value.param == next(iter(kwargs)) and info.value.code == "INVALID_ARG"


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 1}, {"temperature": 0.0}, {"temperature": 100.0}, {"top_p": 1e-6}, {"top_p": 1.0},
    {"seed": 0}, {"seed": MAX_SEED},
])
def test_boundary_params_are_valid(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6, MIN_TEMPERATURE / 2])
def test_tiny_positive_temperatures_are_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=3)  # still valid: the range is [0, 100]
    assert params.greedy
    assert make_generator(params, CPU) is None
    logits = random_logits(3, seed=9) * 30
    tokens = choose_tokens(logits.clone(), [params] * 3, [None] * 3)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(RowSampler([params] * 3, CPU)(logits.clone()), logits.argmax(-1))


def test_min_temperature_itself_samples_and_stays_finite() -> None:
    params = SamplingParams(temperature=MIN_TEMPERATURE, seed=3)
    assert not params.greedy and make_generator(params, CPU) is not None
    logits = torch.tensor([[50.0, 49.99999, -20.0, 10.0]])  # logits / 1e-5 reach 5e6: softmax must stay finite
    sampler = RowSampler([params], CPU)
    seen = {int(sampler(logits.clone())[0]) for _ in range(20)}
    assert seen <= {0, 1} and 0 in seen


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


# -- RowSampler ------------------------------------------------------------------------------------------------
def random_logits(batch: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def draw(params: list[SamplingParams], steps: int = 30, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    """[steps, batch] tokens, the logits of step s being the same for any batch layout of a given row."""
    sampler = RowSampler(params, CPU)
    return torch.stack([sampler(random_logits(len(params), vocab, seed + s)) for s in range(steps)])


def test_greedy_rows_are_argmax() -> None:
    logits = random_logits(4)
    tokens = RowSampler([SamplingParams()] * 4, CPU)(logits.clone())
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_ignore_seed_and_top_p() -> None:
    logits = random_logits(2, seed=3)
    tokens = RowSampler([SamplingParams(seed=5, top_p=0.1), SamplingParams(seed=6)], CPU)(logits.clone())
    assert torch.equal(tokens, logits.argmax(-1))


def test_same_seed_same_tokens() -> None:
    params = [SamplingParams(temperature=1.0, seed=42)]
    a, b = draw(params), draw(params)
    assert torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 3  # it really sampled, not argmax


def test_different_seeds_differ() -> None:
    a = draw([SamplingParams(temperature=1.5, seed=1)])
    b = draw([SamplingParams(temperature=1.5, seed=2)])
    assert not torch.equal(a, b)


def test_unseeded_rows_differ_between_samplers() -> None:
    a = draw([SamplingParams(temperature=1.5)])
    b = draw([SamplingParams(temperature=1.5)])
    assert not torch.equal(a, b)  # fresh random seeds: 30 equal draws would be a 1-in-astronomical event


def test_seeded_row_is_independent_of_batch_composition() -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.8, seed=1234)
    vocab, steps = 40, 25
    alone = RowSampler([seeded], CPU)
    crowd = RowSampler([SamplingParams(), SamplingParams(temperature=2.0, seed=7), seeded,
                        SamplingParams(temperature=1.0)], CPU)
    for step in range(steps):
        row_logits = random_logits(1, vocab, seed=100 + step)
        others = random_logits(4, vocab, seed=900 + step)
        others[2] = row_logits[0]
        assert int(alone(row_logits.clone())[0]) == int(crowd(others)[2])


def test_low_temperature_is_nearly_greedy_high_is_spread() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cold = RowSampler([SamplingParams(temperature=0.01, seed=0)], CPU)
    assert all(int(cold(logits.clone())[0]) == 0 for _ in range(50))
    hot = RowSampler([SamplingParams(temperature=100.0, seed=0)], CPU)
    assert len({int(hot(logits.clone())[0]) for _ in range(200)}) == 4


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    sampler = RowSampler([SamplingParams(temperature=1.0, seed=3)], CPU)
    counts = torch.bincount(torch.stack([sampler(probs.log()[None].clone())[0] for _ in range(2000)]),
                            minlength=3).float() / 2000
    assert torch.allclose(counts, probs, atol=0.04)


def test_top_p_never_samples_filtered_tokens() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    sampler = RowSampler([SamplingParams(temperature=1.0, top_p=0.7, seed=11)], CPU)
    seen = {int(sampler(probs.log()[None].clone())[0]) for _ in range(400)}
    assert seen == {1, 3}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    probs = torch.tensor([0.3, 0.35, 0.35 - 1e-3, 1e-3])
    sampler = RowSampler([SamplingParams(temperature=1.0, top_p=1e-6, seed=0)], CPU)
    assert {int(sampler(probs.log()[None].clone())[0]) for _ in range(100)} == {1}


# -- _top_p_filter ------------------------------------------------------------------------------------------
def test_top_p_filter_keeps_smallest_prefix_reaching_mass() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    assert torch.allclose(_top_p_filter(probs.clone(), 0.65), torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert torch.allclose(_top_p_filter(probs.clone(), 0.95), torch.tensor([0.1, 0.6, 0.3]))
    assert torch.allclose(_top_p_filter(probs.clone(), 0.9001), probs)


def test_top_p_filter_always_keeps_top_token() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(_top_p_filter(probs.clone(), 0.01), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(_top_p_filter(probs.clone(), 0.5 - 1e-4), torch.tensor([0.0, 1.0, 0.0]))


def test_top_p_filter_exact_boundary() -> None:
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert torch.equal(_top_p_filter(probs.clone(), 0.5), torch.tensor([1.0, 0.0, 0.0]))
    # Just above the boundary the next token is needed; a prefix of 0.75 reaches 0.75 exactly.
    assert torch.equal(_top_p_filter(probs.clone(), 0.5 + 1e-6), torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert torch.equal(_top_p_filter(probs.clone(), 0.75), torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert torch.equal(_top_p_filter(probs.clone(), 1.0), probs)


def test_top_p_filter_exact_boundary_in_any_order() -> None:
    probs = torch.tensor([0.125, 0.25, 0.5, 0.125])  # sorted: 0.5 (2), 0.25 (1), 0.125, 0.125
    assert torch.equal(_top_p_filter(probs.clone(), 0.5), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(_top_p_filter(probs.clone(), 0.75), torch.tensor([0.0, 1 / 3, 2 / 3, 0.0]))


def test_top_p_filter_keeps_the_top_token_even_for_a_nonpositive_top_p() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(_top_p_filter(probs.clone(), 0.0), torch.tensor([0.0, 1.0, 0.0]))


def test_top_p_sampling_at_the_exact_boundary_never_draws_the_dropped_tokens() -> None:
    probs = torch.tensor([0.25, 0.5, 0.25])
    sampler = RowSampler([SamplingParams(temperature=1.0, top_p=0.5, seed=4)], CPU)
    assert {int(sampler(probs.log()[None].clone())[0]) for _ in range(200)} == {1}


@given(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_top_p_filter_property(weights: list[float], top_p: float) -> None:
    probs = torch.tensor(weights, dtype=torch.float64)
    probs = probs / probs.sum()
    out = _top_p_filter(probs.clone(), top_p)
    assert torch.isclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    kept = out > 0
    assert kept[probs.argmax()]  # the top token survives
    # Kept tokens are the most probable ones (no dropped token is more likely than a kept one) ...
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()
    # ... their mass reaches top_p, and without the least likely kept one it would not (minimal prefix).
    mass = float(probs[kept].sum())
    assert mass >= top_p - 1e-9 or bool(kept.all())
    assert mass - float(probs[kept].min()) <= top_p + 1e-9
    # Relative probabilities among kept tokens are unchanged.
    assert torch.allclose(out[kept], probs[kept] / probs[kept].sum())
