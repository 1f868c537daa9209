"""One served model in one process: lazy, thread-safe loading and batched generation with per-request errors.

Both the Triton backend and ``triton-vlm infer --direct`` go through :class:`VLMRuntime`, so a served answer
and a direct answer come from the same code with the same settings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from triton_vlm.chat import parse_messages
from triton_vlm.config import ModelSettings
from triton_vlm.errors import GenerationError, InvalidInputError, ModelLoadError, RequestCancelledError, TritonVLMError
from triton_vlm.images import DecodedImages
from triton_vlm.loading import LoadedModel, load_model
from triton_vlm.models import get_family
from triton_vlm.models.generation import CANCELLED, GenerationOutput, Prompt, prompt_text
from triton_vlm.sampling import SamplingParams
from triton_vlm.structured import ResponseFormat

log = logging.getLogger("triton_vlm")


@dataclass(frozen=True)
class GenerationRequest:
    #: Its images in order: the ``image`` of a prompt request, a chat's ``images`` (none: a text-only turn).
    images: tuple[Image.Image, ...]
    #: A user prompt (the ``prompt`` input), or a conversation (the ``messages`` input).
    prompt: Prompt
    params: SamplingParams
    #: The family's canonical task name (e.g. moondream2's "detect"); None: its default behaviour.
    task: str | None = None
    #: Tells whether the client cancelled the request (Triton's ``request.is_cancelled``); polled while it runs.
    is_cancelled: Callable[[], bool] | None = field(default=None, compare=False)

    @property
    def image(self) -> Image.Image | None:
        """The first image (the only one of a prompt request); None for a text-only turn."""
        return self.images[0] if self.images else None

    @property
    def prompt_text(self) -> str:
        """The prompt, or a chat's last user text (for logs, fault injection and answers that quote it)."""
        return prompt_text(self.prompt)


class VLMRuntime:
    """Owns one model: validates requests, loads weights once on first use, generates batches."""

    def __init__(self, settings: ModelSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.family = get_family(settings.family)
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._images = DecodedImages(settings.engine.image_cache_mb << 20)

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def ensure_loaded(self) -> LoadedModel:
        """Load the weights if this is the first call; concurrent callers wait for the one load.

        A failed load raises :class:`ModelLoadError` (whatever went wrong underneath) and leaves nothing
        cached, so the next request tries again.
        """
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    log.info("model %s: loading weights on first use (this can take a while)",
                             self.settings.model_name)
                    try:
                        self._loaded = load_model(self.settings, self.device)
                    except TritonVLMError:
                        raise
                    except Exception as exc:  # load_model converts what it knows; nothing else may escape
                        raise ModelLoadError(f"model {self.settings.model_name!r}: loading failed "
                                             f"({type(exc).__name__}: {exc})") from exc
        return self._loaded

    def make_request(self, image_bytes: bytes, prompt: str | bytes, *, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, ignore_eos: bool = False,
                     task: str | bytes | None = None, response_format: str | bytes | None = None,
                     **options: Any) -> GenerationRequest:
        """Validate raw request values; raises :class:`InvalidInputError` naming the bad field.

        ``task`` names one of the family's skills (see ``ModelFamily.tasks``); families without any refuse it.
        ``options``: further :class:`~triton_vlm.sampling.SamplingParams` fields (``stop``, ``n``, ``logprobs``,
        penalties...), validated there.
        """
        prompt = _text("prompt", prompt)
        task = self.family.normalize_task(None if task is None else _text("task", task))
        if not prompt.strip() and self.family.prompt_required(task):
            raise InvalidInputError("prompt: empty; ask the model something", param="prompt")
        self._check_text([prompt], "prompt")
        params = self._sampling(max_tokens, temperature, top_p, seed, ignore_eos, response_format, options)
        return GenerationRequest(images=(self._decode(image_bytes),), prompt=prompt, params=params, task=task)

    def make_chat_request(self, messages: str | bytes, images: Sequence[bytes] = (), *,
                          max_tokens: int | None = None, temperature: float | None = None,
                          top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                          task: str | bytes | None = None, response_format: str | bytes | None = None,
                          **options: Any) -> GenerationRequest:
        """Validate a chat request: ``messages`` (JSON, :mod:`triton_vlm.chat`) and the file bytes of its images;
        raises :class:`InvalidInputError` naming the bad field (``messages``, ``images``...). Image counts are
        checked against the family's limits before any image is decoded. ``task`` as for :meth:`make_request` (a
        family's skill other than answering takes the last user message's text: ``ModelFamily.render_input``);
        ``options`` as for :meth:`make_request`."""
        family = self.family
        task = family.normalize_task(None if task is None else _text("task", task))
        count = len(images)
        if count > family.max_images_per_request:
            raise InvalidInputError(
                f"images: {count} images in one request; model family {family.name!r} takes at most "
                f"{family.max_images_per_request} per request", param="images")
        if count < family.min_images_per_request:
            raise InvalidInputError(
                f"images: {count} images in this request; model family {family.name!r} needs "
                f"{family.min_images_per_request} per request (it answers about an image, never text alone)",
                param="images")
        chat = parse_messages(_text("messages", messages), count)
        texts = list(chat.texts())
        if not any(text.strip() for text in texts) and not count:
            raise InvalidInputError("messages: no text and no image; ask the model something", param="messages")
        if task is not None and not chat.question.strip() and family.prompt_required(task):
            raise InvalidInputError(f"messages: task {task!r} needs a question in the last user message",
                                    param="messages")
        self._check_text(texts, "messages")
        params = self._sampling(max_tokens, temperature, top_p, seed, ignore_eos, response_format, options)
        decoded = tuple(self._decode(data, f"images[{i}]") for i, data in enumerate(images))
        return GenerationRequest(images=decoded, prompt=chat, params=params, task=task)

    def _decode(self, data: bytes, field: str = "image") -> Image.Image:
        """One request image's file bytes, decoded within the model's limits (or as decoded lately)."""
        limits = self.settings.limits
        return self._images.decode(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                                   max_aspect_ratio=limits.max_image_aspect_ratio, field=field)

    def _check_text(self, texts: list[str], param: str) -> None:
        """The request's texts against the limits: total length, NUL, the family's reserved tokens."""
        limit = self.settings.limits.max_prompt_chars
        length = sum(len(text) for text in texts)
        if length > limit:
            raise InvalidInputError(f"{param}: {length} characters is over the limit of {limit}", param=param)
        for text in texts:
            if "\x00" in text:
                raise InvalidInputError(f"{param}: contains a NUL character", param=param)
            self.family.validate_prompt(text, param)

    def _sampling(self, max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
                  ignore_eos: bool, response_format: str | bytes | None, options: dict[str, Any]) -> SamplingParams:
        limits = self.settings.limits
        fmt = ResponseFormat.parse(response_format)
        if fmt is not None and not self.family.supports_response_format:
            raise InvalidInputError(f"response_format: model family {self.family.name!r} does not support "
                                    "structured output", param="response_format")
        limit = limits.max_tokens_limit
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise InvalidInputError(f"max_tokens must be in [1, {limit}], got {max_tokens}", param="max_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            ignore_eos=ignore_eos,
            response_format=fmt,
            **{name: value for name, value in options.items() if value is not None},
        )

    def token_text(self, token_id: int) -> str:
        """One token's own text (logprobs name their tokens so); the model is loaded."""
        processor = self.ensure_loaded().processor
        return str(getattr(processor, "tokenizer", processor).decode([token_id]))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput | TritonVLMError]:
        """Generate for all ``requests`` in one batch; each slot holds an output or that request's error.

        If the batch fails as a whole, each request is retried alone, so only the request at fault fails.
        Load failures are returned for every request (and retried on the next call).
        """
        if not requests:
            return []
        try:
            loaded = self.ensure_loaded()
        except Exception as exc:  # never raise for a load failure: every request gets the error
            error = exc if isinstance(exc, TritonVLMError) else ModelLoadError(
                f"model {self.settings.model_name!r}: loading failed ({type(exc).__name__}: {exc})")
            return [error] * len(requests)
        try:
            return list(self._run(loaded, requests))
        except Exception as exc:
            if len(requests) == 1:
                return [as_request_error(exc)]
            log.warning("model %s: batch of %d failed (%s); retrying one by one",
                        self.settings.model_name, len(requests), exc)
            results: list[GenerationOutput | TritonVLMError] = []
            for request in requests:
                try:
                    results.extend(self._run(loaded, [request]))
                except Exception as single_exc:
                    results.append(as_request_error(single_exc))
            return results

    def _run(self, loaded: LoadedModel, requests: list[GenerationRequest]) -> list[GenerationOutput | TritonVLMError]:
        outputs = loaded.family.generate(
            loaded.model, loaded.processor, [r.images for r in requests], [r.prompt for r in requests],
            [r.params for r in requests], [r.task for r in requests],
            cancelled=[r.is_cancelled for r in requests] if any(r.is_cancelled for r in requests) else None,
        )
        if len(outputs) != len(requests):  # checked here, so that every caller may pair results with requests
            raise GenerationError(f"model {self.settings.model_name!r}: family {loaded.family.name!r} answered "
                                  f"{len(outputs)} of {len(requests)} requests")
        return [RequestCancelledError(f"model {self.settings.model_name!r}: request cancelled by its client after "
                                      f"{len(o.token_ids)} tokens") if o.finish_reason == CANCELLED else o
                for o in outputs]


def _text(field: str, value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{field}: not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                    param=field) from None
    return value


def as_request_error(exc: BaseException) -> TritonVLMError:
    """The error a request's client gets for ``exc``: ours as it is, anything else mapped to the closest class
    (CUDA out of memory and unknown failures: :class:`GenerationError`; a processor's ``ValueError``:
    :class:`InvalidInputError`)."""
    if isinstance(exc, TritonVLMError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return GenerationError(f"out of GPU memory while generating: {exc}")
    if isinstance(exc, (ValueError, IndexError)):
        # Processor and embedding errors for one request (prompt too long for the context, token mismatch).
        return InvalidInputError(f"request rejected by the model's processor: {exc}")
    return GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
