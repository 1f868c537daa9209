"""The shared ``TritonPythonModel`` implementation; each ``triton_models/<m>/1/model.py`` subclasses it.

``execute`` answers every request exactly once: requests that fail validation get their own error response
(INVALID_ARG), the rest run as ONE batched generation. Nothing is raised out of ``execute``, because that
would fail the whole batch.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm.backend.metrics import BackendMetrics
from triton_vlm.errors import InvalidInputError, ModelLoadError, TritonVLMError
from triton_vlm.generation import GenerationOutput
from triton_vlm.images import image_bytes_from_tensor
from triton_vlm.loading import resolve_device
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.settings import ModelSettings, parameters_from_json_config

log = logging.getLogger("triton_vlm")


class TritonVLMModel:
    """Base for the model repository's ``TritonPythonModel`` classes; subclasses set :attr:`family`."""

    family: ClassVar[str | None] = None

    def initialize(self, args: dict[str, str]) -> None:
        _configure_logging()
        config = json.loads(args["model_config"])
        parameters = parameters_from_json_config(config)
        if self.family:
            parameters.setdefault("model_family", self.family)
        self.model_name = args["model_name"]
        self.settings = ModelSettings.from_parameters(self.model_name, parameters)
        device = resolve_device(self.settings, args.get("model_instance_kind", "CPU"),
                                int(args.get("model_instance_device_id", 0)))
        self.runtime = VLMRuntime(self.settings, device)
        self.metrics = BackendMetrics(self.model_name)
        log.info("model %s (%s) ready on %s; weights load %s", self.model_name, self.settings.family, device,
                 "now (preload)" if self.settings.preload else "on the first request")
        if self.settings.preload:
            self._load()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[GenerationRequest] = []
        slots: list[int] = []
        for index, request in enumerate(requests):
            try:
                batch.append(self._parse(request))
                slots.append(index)
            except TritonVLMError as exc:
                responses[index] = self._error_response(exc)
        if batch:
            was_loaded = self.runtime.loaded is not None
            results = self.runtime.generate(batch)
            if not was_loaded:
                self._record_load()
            self.metrics.batch_size.set(len(batch))
            for index, result in zip(slots, results):
                responses[index] = (self._error_response(result) if isinstance(result, TritonVLMError)
                                    else self._response(result))
        return responses

    def finalize(self) -> None:
        log.info("model %s unloaded", self.model_name)

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

    def _parse(self, request: Any) -> GenerationRequest:
        image = _input(request, "image")
        prompt = _input(request, "prompt")
        if image is None or prompt is None:
            raise InvalidInputError("inputs 'image' and 'prompt' are required")
        prompts = prompt.reshape(-1)
        if prompts.size != 1:
            raise InvalidInputError(f"prompt: expected one string, got {prompts.size}")
        value = prompts[0]
        return self.runtime.make_request(
            image_bytes_from_tensor(image),
            value if isinstance(value, (bytes, str)) else str(value),
            max_tokens=_scalar(request, "max_tokens", int),
            temperature=_scalar(request, "temperature", float),
            top_p=_scalar(request, "top_p", float),
            seed=_scalar(request, "seed", int),
            task=_scalar(request, "task", _as_text),
        )

    def _response(self, output: GenerationOutput) -> Any:
        self.metrics.prompt_tokens.increment(output.prompt_tokens)
        self.metrics.generated_tokens.increment(len(output.token_ids))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("generated_text", np.array([[output.text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("generated_tokens", np.array([[len(output.token_ids)]], dtype=np.int32)),
            pb_utils.Tensor("prompt_tokens", np.array([[output.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[output.finish_reason.encode()]], dtype=np.object_)),
        ])

    def _error_response(self, exc: TritonVLMError) -> Any:
        self.metrics.request_errors.increment(1)
        if isinstance(exc, ModelLoadError):
            log.error("%s", exc)
        code = getattr(pb_utils.TritonError, exc.triton_code, pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc), code))


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request: Any, name: str, kind: type) -> Any:
    array = _input(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInputError(f"{name}: expected one value, got {array.size}")
    return kind(array.reshape(-1)[0])


def _as_text(value: Any) -> bytes | str:
    # STRING tensors arrive as bytes objects; the runtime decodes (and validates) the UTF-8.
    return value if isinstance(value, (bytes, str)) else str(value)


def _configure_logging() -> None:
    # The stub's stdout/stderr land in Triton's log; one handler per process.
    root = logging.getLogger("triton_vlm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[triton_vlm] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
