"""Any image-text-to-text model with a chat template (``AutoModelForImageTextToText``): the ``auto`` family.

A new model is a directory with ``model_family: "auto"`` and its ``hf_model_id`` (``triton-vlm add-model``).
The prompt is the processor's chat template over the conversation (a ``prompt`` request: one user turn,
``[image, text]``) with the generation prompt, with as many images per request as the checkpoint's processor
takes (up to ``max_images_per_request``) or none; the shared batched loop (:mod:`triton_vlm.models.generation`)
generates, with left padding and explicit positions:

* RoPE models count positions from 0 over real tokens (Llama, Mistral, Gemma, Idefics3/SmolVLM, LLaVA-NeXT...);
  PaliGemma counts from 1 (:data:`FIRST_POSITION`).
* Multimodal RoPE (Qwen2-VL, Qwen2.5-VL: 3-D positions over time/height/width of the image) is taken from the
  model's own ``get_rope_index`` at prefill; decode steps continue from the last (text) position + 1.

Refused at load with a clear message: checkpoints without a chat template, and the model types in
:data:`UNSUPPORTED`. ``--tiny`` serves a tiny random checkpoint of one of :data:`TINY_BUILDERS`' architectures,
picked from the hub id (:meth:`AutoFamily.tiny_variant`) and built by the family that has that architecture on
the engine (SmolVLM/Idefics3: ``smolvlm``), so the two routes can be compared on the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from triton_vlm.errors import ModelLoadError
from triton_vlm.models.base import ModelFamily, multimodal_rope

#: Position of the first real token where it is not 0 (by ``config.model_type``).
FIRST_POSITION: dict[str, int] = {"paligemma": 1}
#: Model types the shared loop cannot run correctly, and why.
UNSUPPORTED: dict[str, str] = {
    "kosmos-2": "use model_family kosmos2 (fairseq-style positions; grounding output)",
    "mllama": "its cross-attention image layers need a cross-attention mask at every decode step",
    "idefics": "Idefics (v1) attends to the image through perceiver cross-attention layers",
}


class AutoFamily(ModelFamily):
    name = "auto"
    default_hf_model_id = "HuggingFaceTB/SmolVLM-256M-Instruct"
    # Most current VLMs are released in bfloat16.
    auto_cuda_dtype = "bfloat16"
    # Whatever checkpoint it serves, its chat template's control tokens are the processor's special tokens.
    reserves_processor_tokens = True

    def model_class(self) -> type[Any]:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        model, processor = super().load(source, revision=revision, dtype=dtype, device=device,
                                        local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        model_type = getattr(model.config, "model_type", "?")
        if model_type in UNSUPPORTED:
            raise ModelLoadError(f"{source}: model type {model_type!r} is not served by model_family auto: "
                                 f"{UNSUPPORTED[model_type]}")
        if not getattr(processor, "chat_template", None):
            raise ModelLoadError(f"{source}: its processor has no chat template, which model_family auto needs "
                                 "to build the prompt; use a chat/instruct checkpoint or a dedicated family")
        return model, processor

    # -- stepping ----------------------------------------------------------------------------------------
    def first_position(self, model: Any) -> int:
        return FIRST_POSITION.get(getattr(model.config, "model_type", ""), 0)

    def position_ids(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        rope = multimodal_rope(model, inputs)
        # Multimodal RoPE: [3, batch, seq] (time, height, width); padding is masked out by the attention mask.
        return super().position_ids(model, inputs) if rope is None else rope[0]

    # -- tiny checkpoints --------------------------------------------------------------------------------
    def tiny_variant(self, hf_model_id: str) -> str:
        lowered = hf_model_id.lower()
        for fragment, model_type in TINY_BY_HUB_ID:
            if fragment in lowered:
                return model_type
        return DEFAULT_TINY

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        variant = variant or DEFAULT_TINY
        try:
            family = TINY_BUILDERS[variant]
        except KeyError:
            raise ValueError(f"no tiny build for model type {variant!r}; known: {', '.join(TINY_BUILDERS)}") from None
        from triton_vlm.models.registry import get_family

        get_family(family).build_tiny(path)


# -- tiny checkpoints --------------------------------------------------------------------------------------------
#: model type -> the family whose tiny checkpoint (its ``build_tiny``, found through the registry: a family imports
#: no other) stands in for it: the same architecture, served here through transformers' generate.
TINY_BUILDERS: dict[str, str] = {
    "idefics3": "smolvlm",
}
DEFAULT_TINY = "idefics3"
#: Hub id fragment (lower case) -> the tiny model type that stands in for it under --tiny.
TINY_BY_HUB_ID: tuple[tuple[str, str], ...] = (
    ("smolvlm", "idefics3"),
    ("idefics3", "idefics3"),
)
