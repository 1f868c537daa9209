"""triton_vlm.backend.proxy: the forwarding model hands each request to its engine model and answers it through the
request's own response sender once that answer is complete, not when the rest of its batch is (Triton's utils
faked)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

FINAL = 1


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self.array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.array


class TritonError:
    INVALID_ARG, UNAVAILABLE, INTERNAL, CANCELLED = "INVALID_ARG", "UNAVAILABLE", "INTERNAL", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class Response:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self._tensors, self._error = output_tensors, error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors


class Sender:
    def __init__(self, log: list[tuple[str, Response, int]], name: str) -> None:
        self.log, self.name = log, name

    def send(self, response: Response, flags: int = 0) -> None:
        self.log.append((self.name, response, flags))


class Request:
    def __init__(self, prompt: str, log: list[tuple[str, Response, int]]) -> None:
        self.tensors = [Tensor("image", np.arange(4, dtype=np.uint8)[None, :]),
                        Tensor("prompt", np.array([[prompt.encode()]], dtype=np.object_)),
                        Tensor("stream", np.array([[True]]))]
        self.sender = Sender(log, prompt)

    def inputs(self) -> list[Tensor]:
        return self.tensors

    def get_response_sender(self) -> Sender:
        return self.sender


class EngineCall:
    """``pb_utils.InferenceRequest`` to the engine model; its answer depends on the prompt."""

    sent: list[dict[str, np.ndarray]] = []

    def __init__(self, model_name: str, inputs: list[Tensor], requested_output_names: list[str]) -> None:
        self.inputs = {t.name(): t.as_numpy() for t in inputs}
        EngineCall.sent.append(self.inputs)

    async def async_exec(self, decoupled: bool) -> list[Response]:
        assert decoupled
        prompt = self.inputs["prompt"][0, 0].decode()
        if prompt == "crash":
            raise RuntimeError("stub gone")
        if prompt == "refused":
            return [Response([], TritonError("UNAVAILABLE: overloaded: 3 requests (limit 2)"))]
        await asyncio.sleep(0.3 if prompt == "slow" else 0.0)
        text = np.array([[f"answer to {prompt}".encode()]], dtype=np.object_)
        # A decoupled final answer may come after an empty flag-only response.
        return [Response([Tensor("generated_text", text)]), Response([])]


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.TritonError, utils.InferenceResponse = Tensor, TritonError, Response  # type: ignore[attr-defined]
    utils.InferenceRequest = EngineCall  # type: ignore[attr-defined]
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "triton_vlm.backend.proxy", raising=False)
    EngineCall.sent = []
    module = importlib.import_module("triton_vlm.backend.proxy")
    model = module.ForwardingModel()
    model.initialize({"model_config": json.dumps({"parameters": {"forward_to": {"string_value": "llava_stream"}},
                                                  "output": [{"name": "generated_text"}]})})
    yield model
    sys.modules.pop("triton_vlm.backend.proxy", None)


def serve(model: Any, prompts: list[str]) -> tuple[Any, list[tuple[str, Response, int]], list[Request]]:
    """One execute() call over ``prompts``; what it returned, and every response sent until all are answered."""
    log: list[tuple[str, Response, int]] = []
    requests = [Request(prompt, log) for prompt in prompts]

    async def run() -> Any:
        returned = await model.execute(requests)
        assert log == []  # execute() returns before any answer is in
        for request in requests:  # Triton frees the request's tensors once execute() has returned
            request.tensors[0].array[:] = 0
        assert len(model._pending) == len(requests)  # held until answered
        for _ in range(200):
            if len(log) == len(requests):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        assert not model._pending
        return returned

    return asyncio.run(run()), log, requests


def test_each_request_is_answered_when_it_is_done_not_with_its_batch(proxy: Any) -> None:
    returned, log, _ = serve(proxy, ["slow", "quick"])
    assert returned is None  # the responses go through the senders
    assert [name for name, _, _ in log] == ["quick", "slow"]
    assert all(flags == FINAL for _, _, flags in log)
    for name, response, _ in log:
        (tensor,) = response.output_tensors()
        assert tensor.as_numpy()[0, 0] == f"answer to {name}".encode() and not response.has_error()
    for inputs in EngineCall.sent:
        assert inputs["stream"].tolist() == [[False]]  # one final answer from the engine
        assert inputs["image"].tolist() == [[0, 1, 2, 3]]  # a copy, sent intact after execute() returned


def test_engine_errors_and_failed_calls_are_that_request_s_error(proxy: Any) -> None:
    _, log, _ = serve(proxy, ["refused", "crash", "fine"])
    answers = {name: response for name, response, flags in log if flags == FINAL}
    assert sorted(answers) == ["crash", "fine", "refused"] and len(log) == 3
    refused = answers["refused"].error()
    assert refused.code == "UNAVAILABLE" and refused.message().startswith("overloaded")
    crashed = answers["crash"].error()
    assert crashed.code == "INTERNAL" and "llava_stream" in crashed.message() and "stub gone" in crashed.message()
    assert not answers["fine"].has_error()
