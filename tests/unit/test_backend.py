"""triton_vlm.backend.python_model: execute() answers every request once, batching the valid ones.

``triton_python_backend_utils`` only exists inside Triton's stub, so a small stand-in is installed here.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from typing import Any

import numpy as np
import pytest

from triton_vlm._protocol.wire import WireError, decode_error
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import VLMRuntime

from .helpers import image_bytes


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeTritonError:
    INVALID_ARG, UNAVAILABLE, NOT_FOUND, INTERNAL, CANCELLED = (
        "INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "INTERNAL", "CANCELLED")

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeTritonError | None = None) -> None:
        self.tensors = {t.name: t.array for t in output_tensors}
        self.error = error


class FakeMetric:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        self.value += value


class FakeMetricFamily:
    GAUGE, COUNTER = "gauge", "counter"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str]) -> FakeMetric:  # noqa: N802 - Triton's name
        return FakeMetric()


def fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.TritonError = FakeTritonError  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.MetricFamily = FakeMetricFamily  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: (  # type: ignore[attr-defined]
        FakeTensor(name, request[name]) if name in request else None)
    return module


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    for name in ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("triton_vlm.backend.python_model")
    yield module
    for name in ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics"):
        sys.modules.pop(name, None)


def initialize(backend: Any, family: str, parameters: dict[str, str] | None = None) -> Any:
    class Model(backend.TritonVLMModel):
        pass

    Model.family = family
    model = Model()
    config = {"parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()}}
    model.initialize({"model_config": json.dumps(config), "model_name": family, "model_instance_kind": "CPU",
                      "model_instance_device_id": "0"})
    return model


def request(image: bytes | None, prompt: Any, **scalars: Any) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    if image is not None:
        tensors["image"] = np.frombuffer(image, dtype=np.uint8)[None, :]
    if prompt is not None:
        tensors["prompt"] = np.array([[prompt]], dtype=np.object_)
    dtypes = {"max_tokens": np.int32, "temperature": np.float32, "top_p": np.float32, "seed": np.int64}
    for name, value in scalars.items():
        tensors[name] = np.array([[value]], dtype=dtypes[name])
    return tensors


def test_initialize_reads_config_and_family(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_LLAVA_MAX_TOKENS_LIMIT", "64")
    model = initialize(backend, "llava", {"hf_model_id": "x/y", "default_max_tokens": "9"})
    assert model.settings.family == "llava"  # from the TritonPythonModel class
    assert model.settings.weights.hf_model_id == "x/y" and model.settings.limits.default_max_tokens == 9
    assert model.settings.limits.max_tokens_limit == 64
    assert str(model.runtime.device) == "cpu" and model.runtime.loaded is None
    assert model.metrics.loaded.value == 0


def test_execute_answers_each_request(backend: Any, llava_runtime: VLMRuntime) -> None:
    model = initialize(backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()  # reuse the session's tiny weights
    image = image_bytes(30, 20, seed=4)
    requests = [
        request(image, b"What is this?", max_tokens=4),
        request(b"garbage", b"What is this?"),
        request(image, None),
        request(image, b"Describe.", max_tokens=2, temperature=0.8, top_p=0.9, seed=5),
        request(image, b"<image> again"),
        request(image, b"hi", max_tokens=5000),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    first, bad_image, no_prompt, sampled, reserved, too_many = responses
    expected = llava_runtime.generate([llava_runtime.make_request(image, "What is this?", max_tokens=4)])[0]
    assert isinstance(expected, GenerationOutput)
    assert first.error is None
    assert first.tensors["generated_text"][0, 0].decode() == expected.text
    assert int(first.tensors["generated_tokens"][0, 0]) == 4
    assert int(first.tensors["prompt_tokens"][0, 0]) == expected.prompt_tokens
    assert first.tensors["finish_reason"][0, 0] == b"length"
    assert sampled.error is None and int(sampled.tensors["generated_tokens"][0, 0]) == 2
    for response, fragment, param in ((bad_image, "image:", "image"),
                                      (no_prompt, "'image' and 'prompt' are required", "prompt"),
                                      (reserved, "reserved token", "prompt"), (too_many, "max_tokens must be in",
                                                                               "max_tokens")):
        assert response.error is not None and response.error.code == "INVALID_ARG"
        # The code and the request field at fault travel encoded in the message (Triton carries no field).
        wire = decode_error(response.error.message)
        assert wire is not None and (wire.code, wire.param) == ("INVALID_ARG", param)
        assert fragment in wire.message
        assert response.tensors == {}
    assert model.metrics.request_errors.value == 4
    assert model.metrics.batch_size.value == 2
    assert model.metrics.generated_tokens.value == 6


class CancellableRequest(dict):
    """A request whose client may cancel it, as Triton's ``InferenceRequest.is_cancelled`` tells."""

    def __init__(self, tensors: dict[str, np.ndarray], cancelled: bool) -> None:
        super().__init__(tensors)
        self.cancelled = cancelled
        self.asked = 0

    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.cancelled


def test_requests_cancelled_while_queued_never_run(backend: Any, llava_runtime: VLMRuntime) -> None:
    model = initialize(backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()
    image = image_bytes(30, 20, seed=4)
    gone = CancellableRequest(request(image, b"What is this?", max_tokens=4), cancelled=True)
    kept = CancellableRequest(request(image, b"What is this?", max_tokens=4), cancelled=False)
    cancelled, answered = model.execute([gone, kept])
    assert cancelled.error is not None and cancelled.error.code == "CANCELLED"
    assert "cancelled by its client before it ran" in cancelled.error.message
    assert answered.error is None and int(answered.tensors["generated_tokens"][0, 0]) == 4
    assert model.metrics.request_errors.value == 0  # the client's choice, not a failure
    assert model.metrics.batch_size.value == 1  # the cancelled one was not batched
    assert kept.asked >= 1  # asked before it ran


def test_load_failure_is_unavailable_for_every_request(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = initialize(backend, "llava", {"hf_model_id": "llava-hf/llava-1.5-7b-hf"})
    image = image_bytes(8, 8)
    responses = model.execute([request(image, b"a"), request(image, b"b")])
    assert [r.error.code for r in responses] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert all("llava-hf/llava-1.5-7b-hf" in r.error.message for r in responses)
    assert model.metrics.load_failures.value == 1


def test_scalar_inputs_must_be_single_values(backend: Any) -> None:
    model = initialize(backend, "kosmos2", {"tiny": "true"})
    bad = request(image_bytes(8, 8), b"hi")
    bad["max_tokens"] = np.array([[1, 2]], dtype=np.int32)
    two_prompts = request(image_bytes(8, 8), b"hi")
    two_prompts["prompt"] = np.array([[b"a", b"b"]], dtype=np.object_)
    responses = model.execute([bad, two_prompts])
    assert decode_error(responses[0].error.message) == WireError("INVALID_ARG", "max_tokens: expected one value, got 2",
                                                                 "max_tokens")
    assert decode_error(responses[1].error.message) == WireError("INVALID_ARG", "prompt: expected one string, got 2",
                                                                 "prompt")
    assert model.runtime.loaded is None  # nothing valid, nothing loaded


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_gif_fails_only_its_own_request(backend: Any, llava_runtime: VLMRuntime) -> None:
    from .helpers import truncated_animated_gif

    model = initialize(backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()
    responses = model.execute([request(image_bytes(8, 8), b"hi", max_tokens=1),
                               request(truncated_animated_gif(), b"hi")])
    assert responses[0].error is None and responses[1].error.code == "INVALID_ARG"


def chat_request(messages: str | None, images: list[bytes] | None = None, **extra: np.ndarray) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = dict(extra)
    if messages is not None:
        tensors["messages"] = np.array([[messages.encode()]], dtype=np.object_)
    if images is not None:
        array = np.empty((1, len(images)), dtype=np.object_)
        array[0, :] = images
        tensors["images"] = array
    return tensors


def test_chat_requests_and_the_two_forms(backend: Any, llava_runtime: VLMRuntime) -> None:
    """``messages`` (+ ``images``) beside the seed's ``prompt`` + ``image``: each answered, and a request that mixes
    the forms, or sends neither, refused naming the field."""
    model = initialize(backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()
    image = image_bytes(30, 20, seed=4)
    text_only = '[{"role": "user", "content": "Hi there"}]'
    two = '[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]'
    plain = request(image, b"What is this?", max_tokens=3)
    requests = [
        chat_request(text_only, max_tokens=np.array([[3]], dtype=np.int32)),
        chat_request(two, [image, image_bytes(20, 30, seed=5)], max_tokens=np.array([[3]], dtype=np.int32)),
        plain,
        chat_request(text_only, prompt=plain["prompt"]),
        chat_request(text_only, image=plain["image"]),
        chat_request(None, [image], prompt=plain["prompt"], image=plain["image"]),
        chat_request(None),
        chat_request(None, image=plain["image"]),
        chat_request(two, [image]),
        chat_request(two, [image, b"junk"]),
    ]
    responses = model.execute(requests)
    answered, refused = responses[:3], responses[3:]
    assert [r.error for r in answered] == [None, None, None]
    expected = llava_runtime.generate([llava_runtime.make_chat_request(text_only, max_tokens=3)])[0]
    assert isinstance(expected, GenerationOutput)
    assert answered[0].tensors["generated_text"][0, 0].decode() == expected.text
    assert [int(r.tensors["generated_tokens"][0, 0]) for r in answered] == [3, 3, 3]
    wires = [wire for r in refused if (wire := decode_error(r.error.message)) is not None]
    assert [(w.code, w.param) for w in wires] == [
        ("INVALID_ARG", "prompt"), ("INVALID_ARG", "image"), ("INVALID_ARG", "images"), ("INVALID_ARG", "prompt"),
        ("INVALID_ARG", "prompt"), ("INVALID_ARG", "images"), ("INVALID_ARG", "images")]
    assert "either 'prompt' (with 'image') or 'messages'" in wires[0].message
    assert "goes with 'messages'" in wires[2].message
    assert "'image' and 'prompt' are required (or 'messages' for a chat)" in wires[3].message
    assert "images[1]: not a recognised image" in wires[6].message


def test_a_streamed_piece_carries_only_what_it_has_and_an_end_declares_everything(backend: Any) -> None:
    """Each tensor of a response costs the stub an IPC allocation once per token: a piece that ends nothing leaves
    out empty logprobs, choices and choice 0's index (clients read them as empty); an answer's end has them all."""
    from triton_vlm._protocol import wire
    from triton_vlm.backend.requests import output_response

    common = {"generated_text", "generated_tokens", "prompt_tokens", "finish_reason"}
    assert set(output_response("a", 1, 9, None).tensors) == common
    entry = wire.TokenLogprob(5, "a", -0.5, ())
    assert set(output_response("a", 1, 9, None, logprobs=[entry]).tensors) == common | {"token_logprobs"}
    assert set(output_response("a", 1, 9, None, index=2).tensors) == common | {"index"}
    assert set(output_response("ab", 2, 9, "length", cached_tokens=0).tensors) == common | {
        "token_logprobs", "choices", "index", "cached_tokens"}
