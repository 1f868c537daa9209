"""The adapter interface every model family implements.

The generation loop (:mod:`triton_vlm.models.generation`) is family-agnostic: it asks the adapter how to render
a prompt, encode a batch, number positions and run one forward step. Differences between families live here,
as small overrides, never as copies of the loop.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from triton_vlm.errors import InvalidInputError
from triton_vlm.models.generation import CancelProbes, GenerationOutput, generate_batch, position_ids_for

if TYPE_CHECKING:
    from triton_vlm.engine.adapter import EngineAdapter
    from triton_vlm.sampling import SamplingParams

#: A class named lazily: ``(module, class)``, imported when first asked for (:func:`import_class`).
LazyClass = tuple[str, str]


def import_class(entry: LazyClass) -> Any:
    """The class a lazy ``(module, class)`` entry names, importing its module now."""
    module, name = entry
    return getattr(importlib.import_module(module), name)


class ModelFamily(ABC):
    """One model architecture: how to load it, prompt it, step it and build a tiny copy of it."""

    name: ClassVar[str]
    #: Real weights served by default (Hugging Face model id).
    default_hf_model_id: ClassVar[str]
    #: The ``architectures`` of a checkpoint's config.json that this family serves (transformers' class names, e.g.
    #: ``LlavaForConditionalGeneration``): ``triton-vlm serve ID`` picks the family by them
    #: (:func:`~triton_vlm.models.registry.family_for_architectures`). Empty: picked only by name (``auto``).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`load` can serve this family in this version of the project.
    supported: ClassVar[bool] = True
    #: Tokens a user prompt may not contain because the processor gives them structural meaning.
    reserved_prompt_tokens: ClassVar[tuple[str, ...]] = ()
    #: Precision of ``dtype=auto`` on a GPU: the one the weights were trained and released in.
    auto_cuda_dtype: ClassVar[str] = "float16"
    #: Task names a request may give in its optional ``task`` input; empty: the family has one behaviour.
    tasks: ClassVar[tuple[str, ...]] = ()
    #: Optional outputs beyond the four every model returns, by name, with the value a response carries when
    #: it has nothing to say (e.g. kosmos2's ``entities``: ``"[]"``). The backend sends one only where the
    #: model's config.pbtxt declares it, and then in every response, so a model's outputs never vary.
    extra_outputs: ClassVar[Mapping[str, str]] = {}
    #: Whether :meth:`decode_text` is :meth:`detokenize` stripped, so a stream can build it a few tokens at a time
    #: (:mod:`triton_vlm.detokenizer`); a family that rewrites the whole text (kosmos2's grounding tags) says no.
    incremental_text: ClassVar[bool] = True
    #: The family's :class:`~triton_vlm.engine.adapter.EngineAdapter` as ``(module, class)``, in the family's own
    #: package; imported only when an engine is built. None: only the batched loop serves the family.
    engine_adapter_class: ClassVar[LazyClass | None] = None

    # -- loading -----------------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self) -> type[Any]:
        """The model's class: transformers' (the default :meth:`load` calls its ``from_pretrained``) or ours."""

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        """Load ``(model, processor)`` from a local directory or a hub id; weights from safetensors only."""
        from transformers import AutoProcessor

        common = dict(revision=revision, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(source, **common)
        model = self.model_class().from_pretrained(source, dtype=dtype, use_safetensors=True, **common)
        model.to(device).eval()
        processor.tokenizer.padding_side = "left"
        return model, processor

    @property
    def has_engine(self) -> bool:
        """Whether triton-vlm's engine runs this family (it names an engine adapter): the launcher then serves each
        of its models with a ``<model>_stream`` engine model beside it (launcher/repository.py derives its config)."""
        return self.engine_adapter_class is not None

    def engine_adapter(self) -> EngineAdapter | None:
        """How :mod:`triton_vlm.engine` runs this family (:attr:`engine_adapter_class`); None where only the HF
        path is available."""
        if self.engine_adapter_class is None:
            return None
        return import_class(self.engine_adapter_class)()

    @abstractmethod
    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        """Write a tiny random-weight checkpoint of the real architecture (model + processor) to ``path``.
        ``variant``: the architecture, for families of several (see :meth:`tiny_variant`); None for the others."""

    def tiny_variant(self, hf_model_id: str) -> str | None:
        """Which tiny checkpoint stands in for ``hf_model_id`` under ``--tiny``: None for families of one
        architecture; families of several (``auto``) name the architecture, passed to
        ``build_tiny(path, variant=...)``."""
        return None

    # -- prompting ---------------------------------------------------------------------------------------
    def validate_prompt(self, prompt: str) -> None:
        for token in self.reserved_prompt_tokens:
            if token in prompt:
                raise InvalidInputError(f"prompt: may not contain the reserved token {token!r}", param="prompt")

    def normalize_task(self, task: str | None) -> str | None:
        """The canonical name of a request's ``task`` (None: the default behaviour); raises
        :class:`InvalidInputError` for a task this family does not have."""
        if task is None or not task.strip():
            return None
        raise InvalidInputError(f"task: model family {self.name!r} takes no task (got {task!r}); leave it out",
                                param="task")

    def prompt_required(self, task: str | None) -> bool:
        """Whether a request with this (normalized) task needs a non-empty prompt."""
        return True

    @abstractmethod
    def render_prompt(self, processor: Any, prompt: str) -> Any:
        """The full model input for a user prompt: text with chat template and image placeholder for
        processor-based families, or whatever this family's :meth:`encode` takes."""

    def render_request(self, processor: Any, prompt: str, task: str | None) -> Any:
        """:meth:`render_prompt` under a (normalized) task; families with tasks override this."""
        return self.render_prompt(processor, prompt)

    def encode(self, processor: Any, images: list[Image.Image], texts: list[Any]) -> dict[str, torch.Tensor]:
        """Left-padded batch tensors for the first forward pass."""
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))

    # -- generating --------------------------------------------------------------------------------------
    def generate(self, model: Any, processor: Any, images: list[Image.Image], prompts: list[str],
                 params: list[SamplingParams], tasks: list[str | None],
                 cancelled: CancelProbes | None = None) -> list[GenerationOutput]:
        """Outputs for a batch of requests. The shared decode loop, unless a family has tasks it answers
        another way (it then splits the batch and still runs its text tasks through the loop). ``cancelled``:
        per request, a probe telling whether its client cancelled it (see :func:`generate_batch`)."""
        return generate_batch(self, model, processor, images, prompts, params, tasks, cancelled)

    # -- stepping ----------------------------------------------------------------------------------------
    #: Position id of the first real token. RoPE models count from 0; fairseq-style models from pad+1.
    def first_position(self, model: Any) -> int:
        return 0

    def pad_position(self, model: Any) -> int:
        return 0

    def position_ids(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prefill position ids, counted over real tokens only (left padding): ``[batch, seq]``. Decode steps
        continue from the last one plus one, so a family with multimodal RoPE may return ``[3, batch, seq]``
        as long as its last prompt position is text."""
        return position_ids_for(inputs["attention_mask"], self.first_position(model), self.pad_position(model))

    def prefill(self, model: Any, inputs: dict[str, torch.Tensor], position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        """First forward pass over the whole prompt (and image); returns last-position logits [batch, vocab]."""
        out = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model.forward): cache})
        return out.logits[:, -1, :]

    def decode(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """One incremental step for the tokens just chosen; returns logits [batch, vocab]."""
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_kwarg(model.forward): cache})
        return out.logits[:, -1, :]

    def context_length(self, model: Any) -> int | None:
        """Positions the language model was trained for (prompt, image tokens and answer together); None where
        unknown. The batched path refuses requests that would run past it: RoPE models do not fail there, they
        silently degrade into garbage."""
        config = getattr(model, "config", None)
        for part in (getattr(config, "text_config", None), config):
            value = getattr(part, "max_position_embeddings", None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def stop_token_ids(self, model: Any, processor: Any) -> set[int]:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = processor.tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return {int(i) for i in ids if i is not None}

    def detokenize(self, processor: Any, token_ids: list[int]) -> str:
        """The tokenizer's text for ``token_ids``, before :meth:`decode_text` tidies it."""
        return processor.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode_text(self, processor: Any, token_ids: list[int]) -> str:
        return self.detokenize(processor, token_ids).strip()

    def decode_output(self, processor: Any, token_ids: list[int], image: Image.Image,
                      prompt: str) -> tuple[str, dict[str, str]]:
        """The answer text and its :attr:`extra_outputs` values (JSON strings) for one finished row."""
        return self.decode_text(processor, token_ids), {}


def multimodal_rope(model: Any, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A model's own multimodal RoPE positions for processor outputs ``inputs``: ``([3, batch, seq], deltas [batch,
    1])`` from its ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL: time, height and width over an image's tokens; a
    generated token's position is its index + delta). None for models without one."""
    rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if rope_index is None:
        return None
    # Its arguments vary between transformers releases (mm_token_type_ids since 5.2x): pass those it takes.
    accepted = inspect.signature(rope_index).parameters
    extra = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
    positions, deltas = rope_index(inputs["input_ids"], **extra)
    return positions, deltas


def cache_kwarg(forward: Any) -> str:
    """The name a model's forward uses for its KV cache: ``cache`` (transformers >= 5.2x) or the older one."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
