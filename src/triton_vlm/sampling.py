"""Per-request sampling parameters and the token choice for a batch where each row has its own."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from triton_vlm.errors import InvalidInputError
from triton_vlm.structured import ResponseFormat

MAX_SEED = 2**63 - 1
#: Temperatures below this are greedy. Dividing logits by a tiny positive temperature (1e-40) overflows
#: them to inf and the softmax to NaN; at 1e-5 the distribution is already argmax in every practical case.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` is greedy (the default, reproducible), and so
    is any temperature below :data:`MIN_TEMPERATURE` (accepted, but sampling there would not stay finite)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    #: Generate exactly ``max_tokens`` tokens whatever the model says (benchmarks).
    ignore_eos: bool = False
    #: Structured output (``response_format``): the answer follows this grammar (:mod:`triton_vlm.structured`).
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidInputError(f"temperature must be in [0, 100], got {self.temperature}", param="temperature")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidInputError(f"seed must be in [0, 2**63-1], got {self.seed}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded for this request (random seed when none given); None for greedy requests."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbelow(MAX_SEED) if params.seed is None else params.seed)
    return generator


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token of every row of ``logits`` [rows, vocab]: argmax for greedy rows, a draw from the row's
    own generator (temperature, then top-p) for the others."""
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if generator is None:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens


class RowSampler:
    """Chooses the next token of every row of a fixed batch; each sampled row has its own seeded generator,
    so a seeded request gives the same text whatever batch it lands in."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params = params
        self.generators = [make_generator(p, device) for p in params]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [batch, vocab] -> next token ids [batch]."""
        return choose_tokens(logits, self.params, self.generators)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest most-probable prefix whose mass reaches ``top_p`` (``>=``), renormalized.

    A token is dropped when the tokens before it already reach ``top_p``, so the top token always survives
    and [0.5, 0.25, 0.25] with ``top_p=0.5`` keeps one token.
    """
    sorted_probs, order = probs.sort(descending=True)
    # Mass of the more probable tokens, as a shifted cumulative sum (no cancellation error from subtracting).
    before = sorted_probs.cumsum(-1).roll(1, dims=-1)
    before[..., 0] = 0.0
    drop = before >= top_p
    drop[..., 0] = False  # the top token survives whatever top_p says
    sorted_probs[drop] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum()
