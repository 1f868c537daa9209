"""What goes into the engine (EngineRequest), what comes out (RequestOutput), and the state in between."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from triton_vlm.engine.prefix_cache import PrefixKeys
from triton_vlm.sampling import SamplingParams, TokenLogprob


@dataclass
class EngineRequest:
    """A tokenized request. ``on_output`` is called on the engine thread for every new piece of output and
    must return quickly (put into a queue, send a Triton response)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    #: Family-specific multimodal inputs for the engine adapter (e.g. ``pixel_values``).
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    #: Stop on these token ids (EOS); empty with ``ignore_eos`` benchmarks.
    stop_token_ids: frozenset[int] = frozenset()
    #: The first prefill chunk holds at least this many positions (a prefix that attends both ways).
    min_first_chunk: int = 0
    #: Multimodal RoPE only (``EngineAdapter.rope_positions``): the prompt's rotary positions [rows, prompt_len],
    #: and how far a generated token's rotary position lies from its cache position.
    prompt_positions: torch.Tensor | None = None
    rope_delta: int = 0
    #: The compiled ``response_format`` grammar (``xgrammar.CompiledGrammar``) that masks this request's logits.
    grammar: Any = None
    #: The prompt's block keys for the prefix cache (None: the cache is off, or the prompt is shorter than a block).
    prefix_keys: PrefixKeys | None = None
    #: Which of its request's ``n`` choices this is (the engine makes one per choice; outputs carry it).
    index: int = 0


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: Exception | None = None
    #: Prompt positions whose K/V came from the prefix cache (not prefilled for this request).
    cached_tokens: int = 0
    #: The logprobs of ``new_token_ids`` where the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    #: The choice these tokens belong to (0 to n-1; each choice ends with its own ``finished`` output).
    index: int = 0
    #: On a choice's first token only: ``time.perf_counter()`` when the engine first scheduled its sequence, and
    #: when the token was read back (the engine's share of the time to first token).
    first_token_times: tuple[float, float] | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request. Owned by the engine thread alone."""

    request: EngineRequest
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    #: Prompt positions already in the KV cache.
    num_prefilled: int = 0
    #: Of those, the ones the prefix cache held at admission.
    cached_positions: int = 0
    #: ``time.perf_counter()`` when the scheduler first gave it a slot (0.0 until then).
    admitted_at: float = 0.0
    #: Tokens generated on the device so far, the latest step's included: the engine reads a step's tokens back
    #: while the next step runs, so this can be one ahead of ``output_ids``.
    num_generated: int = 0
    #: Tokens read back (and handed to ``on_output``).
    output_ids: list[int] = field(default_factory=list)
    #: How many tokens it may generate: max_tokens, or fewer where the context ends first.
    max_generated: int | None = None
    #: Prompt embeddings (text + image), built once when the sequence is admitted, freed after prefill.
    prompt_embeds: torch.Tensor | None = None
    #: The request's ``prompt_positions`` on the device, where the decoder takes them (multimodal RoPE); built
    #: and freed with ``prompt_embeds``.
    prompt_positions: torch.Tensor | None = None
    finish_reason: str | None = None
    #: A choice after a request's first waits until the first's prompt is in its slot, and starts from there (the
    #: prefix cache copies it): n choices cost one prefill.
    after: Sequence | None = None

    def __post_init__(self) -> None:
        if self.max_generated is None:
            self.max_generated = self.request.params.max_tokens

    def release_prompt(self) -> None:
        """Free what only prefill needs (the whole prompt is in the cache, or the sequence finished)."""
        self.prompt_embeds = None
        self.prompt_positions = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Positions this sequence occupies once its latest generated token is written."""
        return self.prompt_len + self.num_generated

    @property
    def wants_decode(self) -> bool:
        """Decoding, with tokens left to generate (the last one may still be on its way back)."""
        return self.status is SequenceStatus.DECODING and self.num_generated < (self.max_generated or 0)
