"""Greedy parity with HF ``generate``, where rounding may part them: the first token where the engine and HF
differ, and how far apart HF's own logits put the two choices there (a near-tie, or a fault)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Divergence:
    """Where two greedy token lists part: ``step`` (None where they never do) and, there, HF's logit for its own
    token minus its logit for the engine's (``gap``; 0 where they never part)."""

    step: int | None
    gap: float
    length: int  # tokens compared: all of them, or up to and including ``step``


def hf_greedy_with_logits(family: Any, model: Any, processor: Any, image: Any, prompt: str,
                          max_tokens: int) -> tuple[list[int], list[Any]]:
    """HF ``generate``'s greedy tokens for one request (a processor-based family), and the logits it chose each
    of them from."""
    inputs = processor(images=[image], text=[family.render_prompt(processor, prompt)], return_tensors="pt")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [scores[0].float() for scores in out.scores]


def divergence(ours: list[int], theirs: list[int], logits: list[Any]) -> Divergence:
    """Compare the engine's tokens (``ours``) with HF's (``theirs``, chosen from ``logits``)."""
    # Over the shorter: where one stopped before the other, the lengths differ (handled below).
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if step is None:
        if len(ours) != len(theirs):  # one stopped (EOS) where the other went on
            step = min(len(ours), len(theirs))
            return Divergence(step, float("inf"), step + 1)
        return Divergence(None, 0.0, len(ours))
    return Divergence(step, float(logits[step][theirs[step]] - logits[step][ours[step]]), step + 1)
