"""The shared ``TritonPythonModel`` implementation; each ``triton_models/<m>/1/model.py`` subclasses it.

``execute`` answers every request exactly once: requests that fail validation get their own error response
(INVALID_ARG), the rest run as ONE batched generation. Nothing is raised out of ``execute``, because that
would fail the whole batch: one error boundary (:meth:`TritonVLMModel._boundary`) wraps each request's own work,
and whatever it raises (a bad input, a processor error, CUDA out of memory, a bug) becomes that request's error
response while the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

from triton_vlm._protocol.wire import Choice
from triton_vlm.backend.faults import FaultInjection
from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.backend.requests import (
    declared_extra_outputs,
    error_response,
    extra_values,
    output_response,
    parse_request,
    runtime_from_args,
    wire_logprobs,
)
from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown, startup_failed
from triton_vlm.chat import Chat
from triton_vlm.errors import ModelLoadError, RequestCancelledError, TritonVLMError
from triton_vlm.models.generation import GenerationOutput, Prompt
from triton_vlm.runtime import GenerationRequest, as_request_error

log = logging.getLogger("triton_vlm")


class TritonVLMModel:
    """Base for the model repository's ``TritonPythonModel`` classes; subclasses set :attr:`family`."""

    family: ClassVar[str | None] = None

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging()
        self.runtime = runtime_from_args(args, self.family)
        self.settings = self.runtime.settings
        self.model_name = self.settings.model_name
        self.metrics = BackendMetrics(self.model_name)
        self.metrics.note_weights(self.runtime)
        #: Optional outputs (e.g. kosmos2's entities) this model declares: sent in every response.
        self.extra_outputs = declared_extra_outputs(args, self.runtime.family.extra_outputs)
        self.faults = FaultInjection.from_env()  # test-only; off unless TRITON_VLM_INJECT_FAULTS is set
        log.info("model %s (%s) ready on %s; weights load %s", self.model_name, self.settings.family,
                 self.runtime.device,
                 "now (preload)" if self.settings.weights.preload else "on the first request")
        if self.settings.weights.preload:
            try:
                self._load()
            except BaseException as exc:
                startup_failed(self.model_name, exc)
                raise

    def execute(self, requests: list[Any]) -> list[Any]:
        received = time.perf_counter()
        responses: list[Any] = [None] * len(requests)
        batch: dict[int, GenerationRequest] = {}  # by the request's index
        for index, request in enumerate(requests):
            with self._boundary(responses, index):
                batch[index] = self._parse(request)
        if batch:
            results = self._generate(list(batch.values()))
            for (index, request), result in zip(batch.items(), results, strict=True):
                with self._boundary(responses, index):
                    responses[index] = (self._error_response(result) if isinstance(result, TritonVLMError)
                                        else self._response(result, received))
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s", request_log_line(self.model_name, request, result, received, len(batch)))
        return responses

    def finalize(self) -> None:
        log.info("model %s unloaded", self.model_name)
        quiet_teardown()

    # -- helpers ------------------------------------------------------------------------------------------
    @contextmanager
    def _boundary(self, responses: list[Any], index: int) -> Iterator[None]:
        """The error boundary of request ``index``: whatever its work raises becomes its error response."""
        try:
            yield
        except Exception as exc:
            responses[index] = self._error_response(exc)

    def _parse(self, request: Any) -> GenerationRequest:
        """Validate one request for the batch; raises its error."""
        is_cancelled = getattr(request, "is_cancelled", None)  # Triton's; polled while the batch runs
        if is_cancelled is not None and is_cancelled():  # gave up while queued: no work at all
            raise RequestCancelledError(f"model {self.model_name!r}: request cancelled by its client "
                                        f"before it ran")
        parsed = parse_request(request, self.runtime)
        self.faults.check("parse", parsed.prompt_text)
        return replace(parsed, is_cancelled=is_cancelled)

    def _generate(self, batch: list[GenerationRequest]) -> list[GenerationOutput | TritonVLMError]:
        """The batch's results, one per request (the runtime answers per request, load failures included)."""
        was_loaded = self.runtime.loaded is not None
        try:
            results = self.runtime.generate(batch)
        except Exception as exc:  # what escapes the runtime (a bug) fails this batch's requests, not the model
            log.exception("model %s: batched generation failed", self.model_name)
            return [as_request_error(exc)] * len(batch)
        try:
            if not was_loaded:
                self._record_load()
            self.metrics.batch_size.set(len(batch))
            self.metrics.batch_sizes.observe(len(batch))
        except Exception:  # metrics are reports: the answers still go out
            log.exception("model %s: recording batch metrics failed", self.model_name)
        return results

    def _load(self) -> None:
        try:
            self.runtime.ensure_loaded()
        finally:
            self._record_load()

    def _record_load(self) -> None:
        loaded = self.runtime.loaded
        if loaded is None:
            self.metrics.load_failures.increment(1)
            return
        self.metrics.loaded.set(1)
        self.metrics.load_seconds.set(loaded.load_seconds)

    def _response(self, output: GenerationOutput, received: float) -> Any:
        return answer_response(self.metrics, self.extra_outputs, output, received, self.runtime.token_text)

    def _error_response(self, exc: BaseException) -> Any:
        return failure_response(self.metrics, exc)


def answer_response(metrics: BackendMetrics, extra_outputs: dict[str, str], output: GenerationOutput,
                    received: float, token_text: Callable[[int], str]) -> Any:
    """A finished generation's response, its request observed in ``metrics`` (``received``: perf_counter);
    ``token_text`` names the tokens of its logprobs."""
    generated = len(output.token_ids) + sum(len(c.token_ids) for c in output.choices)
    metrics.observe_request(received, output.first_token_at, output.finished_at or time.perf_counter(),
                            generated, output.prompt_tokens)
    choices = [Choice(i, c.text, c.finish_reason, len(c.token_ids), wire_logprobs(c.logprobs, token_text))
               for i, c in enumerate(output.choices, start=1)]
    return output_response(output.text, len(output.token_ids), output.prompt_tokens, output.finish_reason,
                           extra_values(extra_outputs, output.extras),
                           logprobs=wire_logprobs(output.logprobs, token_text), choices=choices,
                           cached_tokens=0)  # the batched loop keeps no prefix cache


def failure_response(metrics: BackendMetrics, exc: BaseException) -> Any:
    """A request's error response for any exception: ours as it is, anything else as the error
    :func:`~triton_vlm.runtime.as_request_error` makes of it (logged with its traceback: a fault or a bug, e.g.
    CUDA out of memory). Counted as an error unless its client cancelled it."""
    if not isinstance(exc, TritonVLMError):
        error = as_request_error(exc)
        log.error("request failed: %s", error, exc_info=exc)
        exc = error
    if isinstance(exc, RequestCancelledError):
        log.info("%s", exc)  # the client's choice, not an error of ours
        return error_response(exc)
    metrics.request_errors.increment(1)
    if isinstance(exc, ModelLoadError):
        log.error("%s", exc)
    return error_response(exc)


def _prompt_size(prompt: Prompt) -> str:
    if isinstance(prompt, Chat):
        return f"chat of {len(prompt.messages)} messages, {sum(len(t) for t in prompt.texts())} chars"
    return f"prompt {len(prompt)} chars"


def request_log_line(model: str, request: GenerationRequest, result: GenerationOutput | TritonVLMError,
                     received: float, batch: int) -> str:
    """One debug line per answered request: what was asked (sizes, not content) and how it went."""
    images = ", ".join(f"{image.width}x{image.height}" for image in request.images) or "none"
    asked = (f"model {model}: request image {images}, {_prompt_size(request.prompt)}, max_tokens "
             f"{request.params.max_tokens}"
             f"{f', task {request.task}' if request.task else ''}, batch of {batch}")
    seconds = time.perf_counter() - received
    if isinstance(result, TritonVLMError):
        return f"{asked}: error after {seconds:.3f}s: {type(result).__name__}: {result}"
    return (f"{asked}: {result.prompt_tokens} prompt + {len(result.token_ids)} generated tokens, "
            f"{result.finish_reason}, {seconds:.3f}s")
