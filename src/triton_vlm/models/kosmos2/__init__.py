"""Kosmos-2: :mod:`.family` (the adapter the runtime uses: prompts, fairseq positions, grounding output, tiny
checkpoint), :mod:`.engine_adapter` (how :mod:`triton_vlm.engine` runs it: the image's latents into the prompt)
and :mod:`.engine_decoder` (its text decoder over the engine's slot KV cache)."""

from triton_vlm.models.kosmos2.family import Kosmos2Family, grounded_entities, visible_region

__all__ = ["Kosmos2Family", "grounded_entities", "visible_region"]
