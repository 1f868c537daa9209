"""The adapter interface every model family implements.

The generation loop (:mod:`triton_vlm.models.generation`) is family-agnostic: it asks the adapter how to render
a prompt, encode a batch, number positions and run one forward step. Differences between families live here,
as small overrides, never as copies of the loop.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from triton_vlm.chat import Chat
from triton_vlm.detokenizer import IncrementalDetokenizer, held_token_ids
from triton_vlm.errors import InvalidInputError
from triton_vlm.images import image_list
from triton_vlm.models.generation import (
    CancelProbes,
    GenerationOutput,
    Prompt,
    RowImages,
    generate_batch,
    position_ids_for,
)
from triton_vlm.sampling import StopMatcher
from triton_vlm.structured import Grammars, grammars_for

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
    #: Whether the loaded processor's placeholders and special tokens (:func:`reserved_tokens`) are reserved too:
    #: for families that serve whatever checkpoint's chat template, whose control tokens are known only once the
    #: processor is loaded (checked by :meth:`render_input`).
    reserves_processor_tokens: ClassVar[bool] = False
    #: Images one request may carry: at most (the model's own limit, or a guard on the work of decoding them) and
    #: at least (a family whose prompt always holds an image says 1). Checked before any image is decoded.
    max_images_per_request: ClassVar[int] = 8
    min_images_per_request: ClassVar[int] = 0
    #: Whether one batched forward may hold rows with images and rows without (text-only turns); where not, the
    #: batched loop runs the two kinds as separate batches.
    mixes_text_only_rows: ClassVar[bool] = True
    #: The chat template used where the checkpoint's processor has none (Jinja, as transformers renders it). None:
    #: :meth:`render_chat` writes :func:`transcript` instead.
    fallback_chat_template: ClassVar[str | None] = None
    #: Whether requests may carry ``response_format`` (structured output: an HF tokenizer for the grammar and the
    #: shared batched loop, which masks logits with it).
    supports_response_format: ClassVar[bool] = True
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
    def validate_prompt(self, prompt: str, param: str = "prompt") -> None:
        for token in self.reserved_prompt_tokens:
            if token in prompt:
                raise InvalidInputError(f"{param}: may not contain the reserved token {token!r}", param=param)

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

    def render_prompt(self, processor: Any, prompt: str) -> Any:
        """The full model input for a user prompt about one image: text with chat template and image placeholder
        for processor-based families, or whatever this family's :meth:`encode` takes. By default the one-turn
        chat ``[image, prompt]`` through :meth:`render_chat`, so a prompt and the same question as ``messages``
        get the same input."""
        return self.render_chat(processor, Chat.single(prompt))

    def render_request(self, processor: Any, prompt: str, task: str | None) -> Any:
        """:meth:`render_prompt` under a (normalized) task; families with tasks override this."""
        return self.render_prompt(processor, prompt)

    def render_chat(self, processor: Any, chat: Chat) -> Any:
        """The model input for a conversation, in the model's own format: the processor's chat template (or
        :attr:`fallback_chat_template`) with the generation prompt, each image where it stood; a family with
        neither gets :func:`transcript`. Families whose format is not a template override this."""
        template = getattr(processor, "chat_template", None) or self.fallback_chat_template
        if template is None:
            return transcript(chat)
        return processor.apply_chat_template(chat.hf_messages(), chat_template=template, add_generation_prompt=True)

    def render_input(self, processor: Any, prompt: Prompt, task: str | None = None) -> Any:
        """What the batched loop and the engine feed :meth:`encode` (or the engine adapter) for one request: a
        ``prompt`` string under its task (:meth:`render_request`), or a :class:`~triton_vlm.chat.Chat`
        (:meth:`render_chat`). The one place either path renders a request, so the one place that refuses texts
        holding the processor's reserved tokens (:attr:`reserves_processor_tokens`)."""
        if isinstance(prompt, Chat):
            if self.reserves_processor_tokens:
                check_reserved(processor, prompt.texts(), "messages")
            return self.render_chat(processor, prompt)
        if self.reserves_processor_tokens:
            check_reserved(processor, [prompt], "prompt")
        return self.render_request(processor, prompt, task)

    def encode(self, processor: Any, images: Sequence[RowImages], texts: list[Any]) -> dict[str, torch.Tensor]:
        """Left-padded batch tensors for the first forward pass; ``images``: each row's image or list of images,
        in order. One image per row goes to the processor as the flat list processors have always taken; other
        batches as a list per row (which transformers' processors take too), and a batch without images as text
        alone."""
        rows = [image_list(row) for row in images]
        if not any(rows):
            return dict(processor(text=texts, padding=True, return_tensors="pt"))
        batch: list[Any] = [row[0] for row in rows] if all(len(row) == 1 for row in rows) else rows
        return dict(processor(images=batch, text=texts, padding=True, return_tensors="pt"))

    # -- generating --------------------------------------------------------------------------------------
    def generate(self, model: Any, processor: Any, images: Sequence[RowImages], prompts: Sequence[Prompt],
                 params: list[SamplingParams], tasks: list[str | None],
                 cancelled: CancelProbes | None = None) -> list[GenerationOutput]:
        """Outputs for a batch of requests (``images``: each row's image, or its list of images; ``prompts``: a
        prompt string or a :class:`~triton_vlm.chat.Chat`). The shared decode loop, unless a family has tasks it
        answers another way (it then splits the batch and still runs its text tasks through the loop), and in
        two batches where rows with and without images do not mix (:attr:`mixes_text_only_rows`).
        ``cancelled``: per request, a probe telling whether its client cancelled it (see :func:`generate_batch`)."""
        if self.mixes_text_only_rows:
            return generate_batch(self, model, processor, images, prompts, params, tasks, cancelled)
        with_images = [bool(image_list(i)) for i in images]
        results: list[GenerationOutput | None] = [None] * len(prompts)
        for kind in (True, False):
            rows = [i for i, has in enumerate(with_images) if has is kind]
            if rows:
                outputs = generate_batch(self, model, processor, [images[i] for i in rows], [prompts[i] for i in rows],
                                         [params[i] for i in rows], [tasks[i] for i in rows],
                                         None if cancelled is None else [cancelled[i] for i in rows])
                for row, output in zip(rows, outputs, strict=True):
                    results[row] = output
        return [r for r in results if r is not None]

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

    def grammars(self, processor: Any, stop_token_ids: Iterable[int]) -> Grammars:
        """The compiler of ``response_format`` grammars for this family's tokenizer (the processor's HF
        tokenizer). Only for families with :attr:`supports_response_format`."""
        return grammars_for(processor.tokenizer, stop_token_ids)

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

    def decode_output(self, processor: Any, token_ids: list[int], image: Image.Image | None,
                      prompt: str) -> tuple[str, dict[str, str]]:
        """The answer text and its :attr:`extra_outputs` values (JSON strings) for one finished row (``image``: its
        first image, None for a text-only turn; ``prompt``: its prompt, or a chat's last user text)."""
        return self.decode_text(processor, token_ids), {}

    def detokenizer(self, processor: Any) -> IncrementalDetokenizer:
        """The text of a growing list of this family's tokens, a few decoded at a time: :meth:`detokenize`'s (where
        :attr:`incremental_text`, it is :meth:`decode_text` but for the stripping)."""
        return IncrementalDetokenizer(functools.partial(self.detokenize, processor),
                                      held_token_ids(getattr(processor, "tokenizer", processor)))

    def stop_matcher(self, processor: Any, stop: Sequence[str]) -> StopMatcher:
        """What tells when a row's :meth:`decode_text` reaches one of ``stop`` as its tokens come: a few tokens decoded
        a step where that text is :meth:`detokenize`'s, stripped (:attr:`incremental_text`), else the whole text."""
        return StopMatcher(stop, self.detokenizer(processor) if self.incremental_text
                           else functools.partial(self.decode_text, processor))


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


def reserved_tokens(processor: Any) -> list[str]:
    """Tokens a user text may not contain where the family serves the processor's own chat template: the
    processor's image/video placeholders and the tokenizer's special tokens (chat-template control tokens such as
    ``<end_of_utterance>``, ``<|im_end|>``)."""
    tokenizer = processor.tokenizer
    tokens = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    tokens.update(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    tokens.update(str(t) for t in added if getattr(t, "special", False))
    return sorted(t for t in tokens if isinstance(t, str) and t)


def check_reserved(processor: Any, texts: Iterable[str], param: str) -> None:
    """:class:`InvalidInputError` (naming ``param``) where a text holds one of :func:`reserved_tokens`."""
    reserved = reserved_tokens(processor)
    for text in texts:
        for token in reserved:
            if token in text:
                raise InvalidInputError(f"{param}: may not contain the reserved token {token!r}", param=param)


def cache_kwarg(forward: Any) -> str:
    """The name a model's forward uses for its KV cache: ``cache`` (transformers >= 5.2x) or the older one."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def transcript(chat: Chat) -> str:
    """A conversation for a model that has no chat format of its own: a single user turn is its text as it is
    (what the ``prompt`` form sends); earlier turns become ``User: ...`` / ``Assistant: ...`` lines before
    ``User: <question>``, and system text goes in front, followed by a blank line. Image places are left to the
    processor (such models take one image, in front of the text)."""
    system = [m.text for m in chat.messages if m.role == "system"]
    turns = [m for m in chat.messages if m.role != "system"]
    if len(turns) == 1:
        text = turns[0].text
    else:
        text = "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.text}" for m in turns)
    return "\n".join(system) + "\n\n" + text if system else text
