"""triton_vlm.engine.weights: the output projection's layout, tied to the embeddings or not. On CPU no layout is
timed, so the column-major choice a GPU may make is forced here."""

from __future__ import annotations

import pytest
import torch

from triton_vlm.engine import weights


@pytest.fixture
def column_major_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_fastest_layout", lambda weight: weight.t().contiguous().t())


def modules(tied: bool) -> tuple[torch.nn.Linear, torch.nn.Embedding]:
    torch.manual_seed(0)
    embeddings, lm_head = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False)
    if tied:
        lm_head.weight = embeddings.weight
    return lm_head, embeddings


@pytest.mark.usefixtures("column_major_wins")
def test_an_untied_output_weight_moves_to_the_faster_layout_in_place() -> None:
    lm_head, embeddings = modules(tied=False)
    x, before = torch.randn(3, 4), lm_head.weight.detach().clone()
    expected = lm_head(x)
    weight = weights.output_weight(lm_head, embeddings)
    assert weight.stride() == (1, 11) and lm_head.weight.data_ptr() == weight.data_ptr()  # one copy, not two
    assert torch.equal(lm_head.weight, before) and torch.allclose(lm_head(x), expected)


@pytest.mark.usefixtures("column_major_wins")
def test_a_tied_output_weight_gets_its_own_copy_and_the_embeddings_keep_their_rows() -> None:
    lm_head, embeddings = modules(tied=True)
    rows = embeddings.weight.data_ptr()
    weight = weights.output_weight(lm_head, embeddings)
    assert weight.stride() == (1, 11) and weight.data_ptr() != rows
    assert embeddings.weight.data_ptr() == rows and embeddings.weight.is_contiguous()
    assert torch.equal(weight, embeddings.weight)


def test_on_cpu_nothing_moves() -> None:
    lm_head, embeddings = modules(tied=False)
    weight = weights.output_weight(lm_head, embeddings)
    assert weight.data_ptr() == lm_head.weight.data_ptr() and weight.is_contiguous()
