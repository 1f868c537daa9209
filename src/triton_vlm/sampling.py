"""Per-request sampling parameters and the token choice for a batch where each row has its own: penalties on the
logits, the draw (greedy or seeded), each chosen token's logprob and top alternatives, and the stop-string rules
both decode routes share (the batched loop, ``models/generation.py``; the engine, ``engine/engine.py``)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from triton_vlm.detokenizer import IncrementalDetokenizer
from triton_vlm.errors import InvalidInputError
from triton_vlm.structured import ResponseFormat

MAX_SEED = 2**63 - 1
#: Temperatures below this are greedy. Dividing logits by a tiny positive temperature (1e-40) overflows
#: them to inf and the softmax to NaN; at 1e-5 the distribution is already argmax in every practical case.
MIN_TEMPERATURE = 1e-5
#: OpenAI's limits: stop strings per request, choices per request, alternatives per token.
MAX_STOP = 4
MAX_N = 8
MAX_TOP_LOGPROBS = 20


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
    #: The answer ends right before the first of these strings (finish reason "stop"); at most MAX_STOP.
    stop: tuple[str, ...] = ()
    #: Choices for this prompt: one prefill, ``n`` decoding rows (seeded: choice ``i`` draws with ``seed + i``).
    n: int = 1
    #: Return each generated token's logprob (log_softmax of the model's logits), and its ``top_logprobs``
    #: most likely alternatives.
    logprobs: bool = False
    top_logprobs: int = 0
    #: OpenAI's penalties over the generated tokens: ``logit - frequency * count - presence * (count > 0)``.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: HF's (CTRL's) penalty over prompt and generated tokens: a seen token's logit divided by it when positive,
    #: multiplied when negative; 1 is off.
    repetition_penalty: float = 1.0
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
        if len(self.stop) > MAX_STOP:
            raise InvalidInputError(f"stop: at most {MAX_STOP} strings, got {len(self.stop)}", param="stop")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop: an empty string would end every answer before it starts", param="stop")
        if not 1 <= self.n <= MAX_N:
            raise InvalidInputError(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidInputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                    param="top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true", param="top_logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidInputError(f"{name} must be in [-2, 2], got {value}", param=name)
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidInputError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                                    param="repetition_penalty")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_logits(self) -> bool:
        """Whether the token needs more than the argmax of the raw logits (the engine's graphed greedy choice)."""
        return not self.greedy or self.penalized or self.logprobs

    def choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of ``n``: one choice each, seeded ``seed + index`` (so seeded choices
        are reproducible and differ from each other)."""
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        return replace(self, n=1, seed=seed)


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


def penalize(logits: torch.Tensor, params: Sequence[SamplingParams], counts: torch.Tensor,
             prompt_seen: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] (float) with every row's penalties applied, vectorized: ``counts`` [rows, vocab]
    how often each token was generated, ``prompt_seen`` [rows, vocab] which tokens the prompt holds. The
    repetition penalty first (over prompt and generated tokens, as HF's), then OpenAI's frequency and presence
    penalties (over generated tokens). Rows without penalties come out unchanged."""
    device = logits.device
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    generated = counts > 0
    seen = prompt_seen | generated
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * generated.to(logits.dtype)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and its most likely alternatives ``(token id, logprob)``, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepLogprobs:
    """A step's logprobs on the device, read back later (the engine reads a step's tokens one step late):
    ``chosen`` [rows], ``top_ids`` / ``top_values`` [rows, k] with k the largest ``top_logprobs`` of the rows."""

    tokens: torch.Tensor
    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    def rows(self, params: Sequence[SamplingParams]) -> list[TokenLogprob | None]:
        """Per row, its :class:`TokenLogprob` (its own ``top_logprobs`` alternatives), None where not asked."""
        tokens, chosen = self.tokens.tolist(), self.chosen.tolist()
        top_ids, top_values = self.top_ids.tolist(), self.top_values.tolist()
        return [TokenLogprob(tokens[i], chosen[i], tuple(zip(top_ids[i][:p.top_logprobs],
                                                             top_values[i][:p.top_logprobs], strict=True)))
                if p.logprobs else None for i, p in enumerate(params)]


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> StepLogprobs:
    """The logprobs of ``tokens`` [rows] under ``logits`` [rows, vocab] (the model's own, before penalties and
    temperature: what OpenAI reports), and the top alternatives, left on the device."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = max((p.top_logprobs for p in params), default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return StepLogprobs(tokens, logprobs.gather(-1, tokens[:, None].long())[:, 0], top_ids, top_values)


class RowSampler:
    """Chooses the next token of every row of a fixed batch (the batched loop); each sampled row has its own
    seeded generator, so a seeded request gives the same text whatever batch it lands in. Keeps each row's
    token counts where a row has penalties, and each row's logprobs where asked."""

    def __init__(self, params: list[SamplingParams], device: torch.device, vocab: int = 0,
                 prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> None:
        """``vocab``, ``prompt_ids`` [rows, len] and ``prompt_mask`` (1 on real tokens) are needed where a row has
        penalties."""
        self.params = params
        self.generators = [make_generator(p, device) for p in params]
        self.counts: torch.Tensor | None = None
        self.prompt_seen: torch.Tensor | None = None
        if any(p.penalized for p in params):
            assert prompt_ids is not None and vocab > 0
            self.counts = torch.zeros(len(params), vocab, device=device)
            self.prompt_seen = token_mask(prompt_ids, prompt_mask, vocab)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in params]

    def __call__(self, logits: torch.Tensor,
                 constrain: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """``logits`` [batch, vocab] -> next token ids [batch]; counted, their logprobs (of ``logits`` as they
        come) kept where asked. ``constrain`` masks, in place, the penalized copy the tokens are drawn from (a
        ``response_format`` grammar)."""
        processed = logits.float()
        if constrain is not None and self.counts is None:  # penalize() makes its own copy
            processed = processed.clone()
        if self.counts is not None and self.prompt_seen is not None:
            processed = penalize(processed, self.params, self.counts[:, :logits.shape[-1]],
                                 self.prompt_seen[:, :logits.shape[-1]])
        if constrain is not None:
            constrain(processed)
        tokens = choose_tokens(processed, self.params, self.generators)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        if any(p.logprobs for p in self.params):
            for row, entry in enumerate(step_logprobs(logits, tokens, self.params).rows(self.params)):
                if entry is not None:
                    self.logprobs[row].append(entry)
        return tokens


def token_mask(ids: torch.Tensor, mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """[rows, vocab] bool: which tokens of ``ids`` [rows, len] each row holds (where ``mask`` is 1)."""
    ids = ids.long().clamp(0, vocab - 1)
    present = torch.ones_like(ids) if mask is None else mask.long()
    return torch.zeros(ids.shape[0], vocab, dtype=torch.long, device=ids.device).scatter_add_(1, ids, present) > 0


def find_stop(text: str, stop: Sequence[str], start: int = 0, end: int | None = None) -> int | None:
    """Where the answer ends: the index of the earliest stop string in ``text`` (in ``text[start:end]``), or None."""
    found = [at for s in stop if (at := text.find(s, start, end)) >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string."""
    at = find_stop(text, stop)
    return text if at is None else text[:at]


def safe_length(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` (which holds no stop string) may be streamed now: all but the longest suffix that could
    be the start of a stop string (the next tokens may complete it, and its text is never sent)."""
    held = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:size]):
                held = size
                break
    return len(text) - held


class StopMatcher:
    """Whether the answer text of a growing list of generated tokens holds a stop string yet, for both decode routes
    (the batched loop and the engine's response loop), at a few tokens' work per step instead of a decode and a
    search of the whole answer.

    ``source`` gives the text. An :class:`~triton_vlm.detokenizer.IncrementalDetokenizer` builds the tokenizer's text
    a few tokens at a time, and the answer text is that text stripped (a family's ``decode_text``), its held tokens'
    text included as it reads now; a text that only grows needs searching only where a match may have appeared: the
    new text and the ``max(len(stop)) - 1`` characters before it. A callable gives the whole answer text (a family
    whose text is no plain decode, kosmos2's), decoded and searched whole at every step."""

    def __init__(self, stop: Sequence[str], source: IncrementalDetokenizer | Callable[[list[int]], str]) -> None:
        self.stop = tuple(stop)
        self._source = source
        self._overlap = max((len(s) for s in self.stop), default=1) - 1
        self._searched = 0  # the text before this is final and was searched (a match there would have been found)
        self._whole = ""  # the latest answer text from a callable source
        #: Where the answer text ends (its first stop string's index), once found.
        self.at: int | None = None

    def update(self, ids: list[int]) -> int | None:
        """The index in the answer text of ``ids`` (the whole list so far, a token or more longer than the last) of its
        earliest stop string, or None while it holds none. Once found, it stays found (later tokens are no part of
        the answer)."""
        if self.at is not None:
            return self.at
        if not isinstance(self._source, IncrementalDetokenizer):
            text = self._whole = self._source(ids)
            begin, end, final = 0, len(text), 0
        else:
            final_text = self._source.update(ids)
            text = final_text + self._source.pending(ids)
            # The stripped text's bounds in ``text`` (no copy); its final part ends where ``final_text``'s does,
            # since a space at its end may be trailing (stripped) now and inside the text after the next token.
            begin, end, final = _space_before(text), _end_of_text(text), _end_of_text(final_text)
        at = find_stop(text, self.stop, max(begin, self._searched - self._overlap), end)
        self._searched = max(self._searched, final)
        self.at = None if at is None else at - begin
        return self.at

    @property
    def text(self) -> str:
        """The answer text as of the latest :meth:`update` that a stream may send, but for the end that could be the
        start of a stop string (:func:`safe_length`): what no later token changes (a callable source: its text)."""
        return self._source.text.strip() if isinstance(self._source, IncrementalDetokenizer) else self._whole


def _space_before(text: str) -> int:
    """How many whitespace characters ``text`` starts with (as ``str.strip`` counts them)."""
    at = 0
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _end_of_text(text: str) -> int:
    """Where ``text`` ends without its trailing whitespace (as ``str.strip`` counts it)."""
    end = len(text)
    while end and text[end - 1].isspace():
        end -= 1
    return end


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
