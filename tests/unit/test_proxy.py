"""triton_vlm.backend.proxy: the forwarding model hands each request to its engine model and answers it through the
request's own response sender once that answer is complete, not when the rest of its batch is (Triton's utils
and the gRPC client faked; tests/integration/test_streaming.py runs it in a real server)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from triton_vlm._protocol.wire import WireError, decode_error, encode_error

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
    """A request's response sender; its client gave up on requests named "abandoned", and asking about those
    named "unaskable" fails."""

    def __init__(self, log: list[tuple[str, Response, int]], name: str) -> None:
        self.log, self.name = log, name
        self.asked = 0

    def send(self, response: Response, flags: int = 0) -> None:
        self.log.append((self.name, response, flags))

    def is_cancelled(self) -> bool:
        self.asked += 1
        if self.name == "unaskable":
            raise RuntimeError("stub IPC failed")
        return self.name == "abandoned"


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


class InferInput:
    def __init__(self, name: str, shape: list[int], datatype: str) -> None:
        self.name, self.shape, self.datatype = name, shape, datatype

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        self.array = array.copy()  # tritonclient serializes it here


class InferRequestedOutput:
    def __init__(self, name: str) -> None:
        self.name = name


class Param:
    def __init__(self, flag: bool) -> None:
        self.bool_param = flag


class Result:
    """A ModelStreamInfer response: outputs and Triton's final flag (``triton_final_response``)."""

    def __init__(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        self.arrays = outputs
        self.outputs = list(outputs)
        self.parameters = {"triton_final_response": Param(final)}

    def get_response(self) -> Result:
        return self

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


class GrpcClient:
    """``tritonclient.grpc.aio.InferenceServerClient``: each ``stream_infer`` is a stream of its own, answered by
    prompt; the stream ends once the client has half-closed it, as Triton's does."""

    urls: list[str] = []
    sent: list[dict[str, Any]] = []
    cancelled: list[str] = []

    def __init__(self, url: str) -> None:
        GrpcClient.urls.append(url)

    async def stream_infer(self, requests: Any, stream_timeout: float | None = None) -> Any:
        request = await requests.__anext__()
        GrpcClient.sent.append(request)
        prompt = {t.name: t for t in request["inputs"]}["prompt"].array[0, 0].decode()
        if prompt == "crash":
            raise RuntimeError("stream broken")
        if prompt == "refused":  # an engine error arrives as a bare message on a stream, encoded by the backend
            yield None, InferenceServerException(msg=encode_error("UNAVAILABLE", "overloaded: 3 requests (limit 2)"))
        elif prompt == "bad image":
            yield None, InferenceServerException(msg=encode_error("INVALID_ARG", "image: empty", "image"))
        elif prompt == "abandoned":
            try:
                await asyncio.Event().wait()  # generating for as long as nobody cancels it
            except asyncio.CancelledError:
                GrpcClient.cancelled.append(prompt)
                raise
        else:
            await asyncio.sleep(0.3 if prompt in ("slow", "unaskable") else 0.0)
            text = np.array([[f"answer to {prompt}".encode()]], dtype=np.object_)
            # The final answer may come as the outputs, then an empty flag-only response.
            yield Result({"generated_text": text}, final=False), None
            yield Result({}, final=True), None
        async for _ in requests:  # until the client half-closes
            pass


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.TritonError, utils.InferenceResponse = Tensor, TritonError, Response  # type: ignore[attr-defined]
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    # No utils.InferenceRequest: the forwarder makes no BLS call (Triton 2.51's stub died of them under load).
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    aio = types.ModuleType("tritonclient.grpc.aio")
    aio.InferenceServerClient, aio.InferInput = GrpcClient, InferInput  # type: ignore[attr-defined]
    aio.InferRequestedOutput = InferRequestedOutput  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.aio", aio)
    # ``import tritonclient.grpc.aio as x`` binds the parent package's attribute: the fake must be that too, whether
    # or not an earlier test imported the real one.
    monkeypatch.setattr(importlib.import_module("tritonclient.grpc"), "aio", aio, raising=False)
    monkeypatch.delitem(sys.modules, "triton_vlm.backend.proxy", raising=False)
    GrpcClient.urls, GrpcClient.sent, GrpcClient.cancelled = [], [], []
    module = importlib.import_module("triton_vlm.backend.proxy")
    model = module.ForwardingModel()
    model.initialize({"model_config": json.dumps({
        "parameters": {"forward_to": {"string_value": "llava_stream"},
                       "forward_grpc_url": {"string_value": "127.0.0.1:18001"}},
        "output": [{"name": "generated_text"}, {"name": "generated_tokens"}]})})
    yield model
    model.finalize()
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
        for _ in range(300):
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
        (tensor,) = response.output_tensors()  # generated_tokens was not in the engine's answer
        assert tensor.name() == "generated_text" and not response.has_error()
        assert tensor.as_numpy()[0, 0] == f"answer to {name}".encode()
    assert GrpcClient.urls == ["127.0.0.1:18001"]  # one client an instance, at the address the launcher wrote
    for request in GrpcClient.sent:
        assert request["model_name"] == "llava_stream"
        inputs = {t.name: t for t in request["inputs"]}
        assert inputs["stream"].array.tolist() == [[False]] and inputs["stream"].datatype == "BOOL"
        assert inputs["image"].array.tolist() == [[0, 1, 2, 3]] and inputs["image"].datatype == "UINT8"
        assert inputs["prompt"].datatype == "BYTES"
        assert [o.name for o in request["outputs"]] == ["generated_text", "generated_tokens"]


def test_engine_errors_and_failed_calls_are_that_request_s_error(proxy: Any) -> None:
    """An engine error is passed on with its code (Triton's, for plain infer callers) and, encoded in the message,
    its request field; a failed call is the request's INTERNAL error."""
    _, log, _ = serve(proxy, ["refused", "bad image", "crash", "fine"])
    answers = {name: response for name, response, flags in log if flags == FINAL}
    assert sorted(answers) == ["bad image", "crash", "fine", "refused"] and len(log) == 4
    refused = answers["refused"].error()
    assert refused.code == "UNAVAILABLE"
    assert decode_error(refused.message()) == WireError("UNAVAILABLE", "overloaded: 3 requests (limit 2)")
    bad = answers["bad image"].error()
    assert bad.code == "INVALID_ARG"
    assert decode_error(bad.message()) == WireError("INVALID_ARG", "image: empty", "image")
    crashed = answers["crash"].error()
    assert crashed.code == "INTERNAL" and "llava_stream" in crashed.message() and "stream broken" in crashed.message()
    assert decode_error(crashed.message()) is not None
    assert not answers["fine"].has_error()


def test_calls_to_the_engine_are_in_flight_together(proxy: Any) -> None:
    """The engine batches what it is given: 40 calls of 0.3 s each must overlap, not queue behind one another
    (12 s one by one, as an earlier forwarder that waited for each call in execute's own thread served them)."""
    start = time.monotonic()
    _, log, _ = serve(proxy, ["slow"] * 40)
    assert len(log) == 40 and not any(response.has_error() for _, response, _ in log)
    assert time.monotonic() - start < 3


def test_a_request_its_client_gave_up_on_is_cancelled_in_the_engine_too(proxy: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton tells the forwarder (``is_cancelled``) that a client left or its deadline passed; the forwarder
    cancels its gRPC stream, which cancels the request in the engine, instead of generating for nobody."""
    monkeypatch.setattr(sys.modules["triton_vlm.backend.proxy"], "CANCEL_POLL_S", 0.05)
    start = time.monotonic()
    _, log, requests = serve(proxy, ["abandoned", "unaskable", "quick"])
    answers = {name: (response, flags) for name, response, flags in log}
    assert sorted(answers) == ["abandoned", "quick", "unaskable"] and len(log) == 3
    assert GrpcClient.cancelled == ["abandoned"]
    abandoned, flags = answers["abandoned"]
    assert flags == FINAL and abandoned.error().code == "CANCELLED"
    assert not answers["unaskable"][0].has_error()  # a question that failed is not a cancellation
    assert requests[1].sender.asked >= 1 and requests[2].sender.asked == 0  # answered before the first question
    assert time.monotonic() - start < 1  # cancelled at the first question, not after a whole answer
