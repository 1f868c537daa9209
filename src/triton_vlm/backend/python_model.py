"""The shared ``TritonPythonModel`` implementation; each ``triton_models/<m>/1/model.py`` subclasses it.

``execute`` answers every request exactly once: requests that fail validation get their own error response
(INVALID_ARG), the rest run as ONE batched generation. Nothing is raised out of ``execute``, because that
would fail the whole batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, ClassVar

from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.backend.requests import (declared_extra_outputs, error_response, extra_values, output_response,
                                         parse_request, runtime_from_args)
from triton_vlm.backend.stub_logging import configure_logging, quiet_teardown
from triton_vlm.errors import ModelLoadError, RequestCancelledError, TritonVLMError
from triton_vlm.generation import GenerationOutput
from triton_vlm.runtime import GenerationRequest

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
        #: Optional outputs (e.g. kosmos2's entities) this model declares: sent in every response.
        self.extra_outputs = declared_extra_outputs(args, self.runtime.family.extra_outputs)
        log.info("model %s (%s) ready on %s; weights load %s", self.model_name, self.settings.family,
                 self.runtime.device,
                 "now (preload)" if self.settings.preload else "on the first request")
        if self.settings.preload:
            self._load()

    def execute(self, requests: list[Any]) -> list[Any]:
        received = time.perf_counter()
        responses: list[Any] = [None] * len(requests)
        batch: list[GenerationRequest] = []
        slots: list[int] = []
        for index, request in enumerate(requests):
            try:
                is_cancelled = getattr(request, "is_cancelled", None)  # Triton's; polled while the batch runs
                if is_cancelled is not None and is_cancelled():  # gave up while queued: no work at all
                    raise RequestCancelledError(f"model {self.model_name!r}: request cancelled by its client "
                                                f"before it ran")
                batch.append(replace(parse_request(request, self.runtime), is_cancelled=is_cancelled))
                slots.append(index)
            except TritonVLMError as exc:
                responses[index] = self._error_response(exc)
        if batch:
            was_loaded = self.runtime.loaded is not None
            results = self.runtime.generate(batch)
            if not was_loaded:
                self._record_load()
            self.metrics.batch_size.set(len(batch))
            self.metrics.batch_sizes.observe(len(batch))
            for index, request, result in zip(slots, batch, results):
                responses[index] = (self._error_response(result) if isinstance(result, TritonVLMError)
                                    else self._response(result, received))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s", request_log_line(self.model_name, request, result, received, len(batch)))
        return responses

    def finalize(self) -> None:
        log.info("model %s unloaded", self.model_name)
        quiet_teardown()

    # -- helpers ------------------------------------------------------------------------------------------
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
        return answer_response(self.metrics, self.extra_outputs, output, received)

    def _error_response(self, exc: TritonVLMError) -> Any:
        return failure_response(self.metrics, exc)


def answer_response(metrics: BackendMetrics, extra_outputs: dict[str, str], output: GenerationOutput,
                    received: float) -> Any:
    """A finished generation's response, its request observed in ``metrics`` (``received``: perf_counter)."""
    metrics.observe_request(received, output.first_token_at, output.finished_at or time.perf_counter(),
                            len(output.token_ids), output.prompt_tokens)
    return output_response(output.text, len(output.token_ids), output.prompt_tokens, output.finish_reason,
                           extra_values(extra_outputs, output.extras))


def failure_response(metrics: BackendMetrics, exc: TritonVLMError) -> Any:
    """A request's error response; counted as an error unless its client cancelled it."""
    if isinstance(exc, RequestCancelledError):
        log.info("%s", exc)  # the client's choice, not an error of ours
        return error_response(exc)
    metrics.request_errors.increment(1)
    if isinstance(exc, ModelLoadError):
        log.error("%s", exc)
    return error_response(exc)


def request_log_line(model: str, request: GenerationRequest, result: GenerationOutput | TritonVLMError,
                     received: float, batch: int) -> str:
    """One debug line per answered request: what was asked (sizes, not content) and how it went."""
    asked = (f"model {model}: request image {request.image.width}x{request.image.height}, prompt "
             f"{len(request.prompt)} chars, max_tokens {request.params.max_tokens}"
             f"{f', task {request.task}' if request.task else ''}, batch of {batch}")
    seconds = time.perf_counter() - received
    if isinstance(result, TritonVLMError):
        return f"{asked}: error after {seconds:.3f}s: {type(result).__name__}: {result}"
    return (f"{asked}: {result.prompt_tokens} prompt + {len(result.token_ids)} generated tokens, "
            f"{result.finish_reason}, {seconds:.3f}s")
