"""The batched decode loop shared by every family (CPU and GPU, served and direct).

One call generates for a whole batch: a left-padded prefill, then one forward step per token for all rows
that are still running. Rows stop on their own EOS or ``max_tokens``; each row samples with its own
parameters (:class:`~triton_vlm.sampling.RowSampler`). Explicit position ids make a padded row see exactly
the positions it would see alone, so a batch returns what single requests return.

A row whose client cancels stops at the next check (at most every :data:`CANCEL_CHECK_S`: each check is an IPC
round trip to Triton per request), so its work ends with it and the rest of the batch goes on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from triton_vlm.chat import Chat
from triton_vlm.errors import InvalidInputError
from triton_vlm.images import image_list
from triton_vlm.sampling import RowSampler, SamplingParams, TokenLogprob, cut_at_stop
from triton_vlm.structured import GrammarState, mask_logits

if TYPE_CHECKING:
    # Only for annotations: ModelFamily's default generate() is this loop, so base imports this module.
    from triton_vlm.models.base import ModelFamily


#: Finish reason of a row whose client cancelled it (the backend answers it with a CANCELLED error).
CANCELLED = "cancelled"
#: How often running rows are asked whether their client cancelled them.
CANCEL_CHECK_S = 0.1

#: Per row: a callable telling whether its request was cancelled, or None (never asked).
CancelProbes = Sequence[Callable[[], bool] | None]
#: A row's images: one image (the ``prompt`` form) or a list of them (a chat's: several, or none at all).
RowImages = Image.Image | Sequence[Image.Image]
#: A row's request: a user prompt (rendered under its task) or a whole conversation.
Prompt = str | Chat


def prompt_text(prompt: Prompt) -> str:
    """The text a row's answer refers to: its prompt, or a chat's last user text."""
    return prompt.question if isinstance(prompt, Chat) else prompt


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    #: Structured extras by output name (e.g. kosmos2's ``entities`` JSON); see ``ModelFamily.extra_outputs``.
    extras: Mapping[str, str] = field(default_factory=dict)
    #: Each generated token's logprob and alternatives, where the request asked (``SamplingParams.logprobs``).
    logprobs: tuple[TokenLogprob, ...] = ()
    #: A request for ``n`` choices: choices 1 to n-1 (this output is choice 0).
    choices: tuple[GenerationOutput, ...] = ()
    #: ``time.perf_counter()`` when the first token was chosen and when this row finished (metrics only; None
    #: where the answer is not a token stream). Not part of equality: two runs give the same output.
    first_token_at: float | None = field(default=None, compare=False)
    finished_at: float | None = field(default=None, compare=False)


def position_ids_for(attention_mask: torch.Tensor, first: int, pad: int) -> torch.Tensor:
    """Positions counted over real tokens only: ``first, first+1, ...``; padding gets ``pad``."""
    counted = attention_mask.long().cumsum(-1) - 1 + first
    return torch.where(attention_mask.bool(), counted, torch.full_like(counted, pad))


def grammar_states(family: ModelFamily, processor: Any, params: Sequence[SamplingParams],
                   stop_token_ids: Sequence[int]) -> list[GrammarState | None]:
    """Each row's grammar state (None for a row without ``response_format``)."""
    formats = [p.response_format for p in params]
    if not any(formats):
        return [None] * len(params)
    grammars = family.grammars(processor, stop_token_ids)
    return [None if f is None else GrammarState(grammars.compile(f)) for f in formats]


def check_context(family: ModelFamily, model: Any, prompt_tokens: list[int], params: list[SamplingParams]) -> None:
    """Refuse a batch in which a request's prompt (image tokens included) plus ``max_tokens`` exceeds the model's
    context. The runtime then retries the batch one by one, so only the request at fault fails."""
    limit = family.context_length(model)
    if limit is None:
        return
    for used, p in zip(prompt_tokens, params, strict=True):
        if used + p.max_tokens > limit:
            room = limit - used
            advice = (f"ask for at most max_tokens={room}" if room > 0 else "shorten the prompt")
            raise InvalidInputError(
                f"prompt: {int(used)} tokens (image included) + max_tokens {p.max_tokens} exceed the model's "
                f"context of {limit} tokens; {advice}", param="prompt")


@torch.inference_mode()
def generate_batch(family: ModelFamily, model: Any, processor: Any, images: Sequence[RowImages],
                   prompts: Sequence[Prompt], params: list[SamplingParams],
                   tasks: list[str | None] | None = None, cancelled: CancelProbes | None = None) -> list[GenerationOutput]:
    """Generate for ``len(prompts)`` requests in one batched loop; ``prompts`` are user prompts (``tasks`` their
    (normalized) task names, None for the family's default) or conversations, ``images`` each row's image or
    images (none: a text-only turn). Rows whose ``cancelled`` probe says so stop early with finish reason
    :data:`CANCELLED`. A request for ``n`` choices is prefilled once and decoded as ``n`` rows (its KV copied), its
    output holding the other choices."""
    from transformers import DynamicCache

    device = model.device
    tasks = tasks or [None] * len(prompts)
    texts = [family.render_input(processor, p, t) for p, t in zip(prompts, tasks, strict=True)]
    row_images = [image_list(i) for i in images]
    inputs = family.encode(processor, row_images, texts)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    attention_mask = inputs["attention_mask"]
    positions = family.position_ids(model, inputs)
    prompt_tokens = attention_mask.sum(-1).tolist()
    check_context(family, model, prompt_tokens, params)

    cache = DynamicCache()
    logits = family.prefill(model, inputs, positions, cache)
    prompt_ids = inputs["input_ids"]
    owners = [row for row, p in enumerate(params) for _ in range(p.n)]
    if len(owners) > len(params):  # n choices: the prompt was prefilled once; its KV is copied into n rows
        index = torch.tensor(owners, device=device)
        cache.batch_select_indices(index)
        logits, attention_mask, prompt_ids = logits[index], attention_mask[index], prompt_ids[index]
        positions = positions.index_select(-2, index)
        params = [p.choice(i) if p.n > 1 else p for p in params for i in range(p.n)]
        prompt_tokens = [prompt_tokens[row] for row in owners]
        row_images = [row_images[row] for row in owners]
        prompts = [prompts[row] for row in owners]
        cancelled = None if cancelled is None else [cancelled[row] for row in owners]

    batch = len(params)
    stop_ids = torch.tensor(sorted(family.stop_token_ids(model, processor)), device=device, dtype=torch.long)
    # Rows that ignore EOS never stop on it, except under a grammar (whose accepting end is EOS).
    row_stop = torch.tensor([p.ignore_eos and p.response_format is None for p in params], device=device)
    pad_id = processor.tokenizer.pad_token_id or 0
    limits = torch.tensor([p.max_tokens for p in params], device=device)
    grammars = grammar_states(family, processor, params, stop_ids.tolist())
    sampler = RowSampler(params, device, logits.shape[-1], prompt_ids, attention_mask)
    # Rows that end on a stop string (it may span tokens): each with its own matcher.
    stopping = {row: family.stop_matcher(processor, p.stop) for row, p in enumerate(params) if p.stop}
    generated: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    running = torch.ones(batch, dtype=torch.bool, device=device)
    first_token_at = 0.0
    finished_at = [0.0] * batch
    step = 0
    next_cancel_check = time.perf_counter() + CANCEL_CHECK_S
    while True:
        tokens = sampler(logits, functools.partial(mask_logits, states=grammars) if any(grammars) else None)
        is_stop = torch.isin(tokens, stop_ids) & ~row_stop
        step += 1
        rows = running.nonzero().flatten().tolist()
        for row in rows:
            if is_stop[row]:
                finish[row] = "stop"
            else:
                generated[row].append(int(tokens[row]))
                if (state := grammars[row]) is not None:
                    state.accept(int(tokens[row]))
        running &= ~is_stop & (limits > step)
        for row, matcher in stopping.items():  # the row ends once a stop string shows in its text
            if running[row] and matcher.update(generated[row]) is not None:
                finish[row] = "stop"
                running[row] = False
        now = time.perf_counter()
        if cancelled is not None and now >= next_cancel_check:
            next_cancel_check = now + CANCEL_CHECK_S
            gone = [row for row in running.nonzero().flatten().tolist() if (probe := cancelled[row]) and probe()]
            for row in gone:
                finish[row] = CANCELLED
            if gone:
                running[gone] = False
        if step == 1:
            first_token_at = now
        still = running.tolist()
        for row in rows:
            if not still[row]:
                finished_at[row] = now
                grammars[row] = None  # a finished row steps on with pad tokens, outside its grammar
        if not running.any():
            break
        # Finished rows keep stepping with a pad token (masked out) until the whole batch is done.
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad_id))
        attention_mask = torch.cat([attention_mask, running.to(attention_mask.dtype)[:, None]], dim=-1)
        positions = positions[..., -1:] + 1  # [batch, 1], or [3, batch, 1] for multimodal RoPE
        logits = family.decode(model, tokens[:, None], attention_mask, positions, cache)

    outputs = []
    per_request = zip(generated, prompt_tokens, finish, finished_at, row_images, prompts, params, sampler.logprobs,
                      strict=True)
    for ids, n, reason, done, own_images, prompt, p, logprobs in per_request:
        text, extras = family.decode_output(processor, ids, own_images[0] if own_images else None, prompt_text(prompt))
        outputs.append(GenerationOutput(text=cut_at_stop(text, p.stop), token_ids=tuple(ids), prompt_tokens=int(n),
                                        finish_reason=reason, extras=extras, logprobs=tuple(logprobs[:len(ids)]),
                                        first_token_at=first_token_at, finished_at=done))
    return group_choices(outputs, owners)


def group_choices(rows: Sequence[GenerationOutput], owners: Sequence[int]) -> list[GenerationOutput]:
    """One output per request from its rows (``owners[i]``: the request of row ``i``): the first choice, the others
    in its ``choices``."""
    grouped: dict[int, list[GenerationOutput]] = {}
    for owner, row in zip(owners, rows, strict=True):
        grouped.setdefault(owner, []).append(row)
    return [replace(first, choices=tuple(others)) if others else first
            for first, *others in (grouped[owner] for owner in sorted(grouped))]
