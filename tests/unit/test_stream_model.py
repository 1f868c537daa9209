"""triton_vlm.backend.stream_model: what the engine model's final response carries (Triton's utils faked)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from triton_vlm.engine import RequestOutput
from triton_vlm.models.kosmos2 import grounded_entities
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import SamplingParams

from .test_backend import FakeMetric, fake_pb_utils

MODULES = ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics",
           "triton_vlm.backend.stream_model")
PROMPT = "<grounding>An image of"


@pytest.fixture
def stream_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    utils = fake_pb_utils()
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("triton_vlm.backend.stream_model")
    for name in MODULES:
        sys.modules.pop(name, None)


def grounded_answer(processor: Any) -> list[int]:
    """Token ids of ``<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>``."""
    tokenizer = processor.tokenizer
    tags = tokenizer.convert_tokens_to_ids
    return [tags("<phrase>"), *tokenizer(" a dog", add_special_tokens=False).input_ids,
            *tags(["</phrase>", "<object>", "<patch_index_0044>", "<patch_index_0863>", "</object>"])]


def finish(module: Any, runtime: VLMRuntime, extra_outputs: dict[str, str], token_ids: list[int]) -> Any:
    """Run the response thread's delivery of a finished request; returns the one response it sent."""
    model = object.__new__(module.TritonVLMStreamModel)  # no initialize(): no threads, no engine
    model.runtime, model.extra_outputs = runtime, extra_outputs
    model.metrics = SimpleNamespace(observe_request=lambda *args: None, request_errors=FakeMetric())
    sent: list[tuple[Any, int]] = []
    sender = SimpleNamespace(send=lambda response=None, flags=0: sent.append((response, flags)))
    request = GenerationRequest(image=Image.new("RGB", (64, 48)), prompt=PROMPT, params=SamplingParams())
    state = module._Stream(sender=sender, stream=True, token_ids=token_ids, request=request)
    model._deliver(state, RequestOutput("r1", (), True, "stop", prompt_tokens=70, generated_tokens=len(token_ids)))
    (response, flags), = sent
    assert flags == module.FINAL
    return response


def test_the_final_response_carries_the_entities_of_the_whole_answer(stream_model: Any,
                                                                     kosmos2_runtime: VLMRuntime) -> None:
    processor = kosmos2_runtime.ensure_loaded().processor
    ids = grounded_answer(processor)
    response = finish(stream_model, kosmos2_runtime, {"entities": "[]"}, ids)
    text, entities = grounded_entities(processor, processor.tokenizer.decode(ids, skip_special_tokens=True),
                                       (64, 48), PROMPT)
    assert entities and entities[0]["phrase"] == "a dog" and len(entities[0]["boxes"]) == 1
    assert json.loads(response.tensors["entities"][0][0].decode()) == entities
    assert response.tensors["generated_text"][0][0].decode() == text.strip()


def test_a_model_that_declares_no_extra_outputs_sends_none(stream_model: Any, kosmos2_runtime: VLMRuntime) -> None:
    processor = kosmos2_runtime.ensure_loaded().processor
    response = finish(stream_model, kosmos2_runtime, {}, grounded_answer(processor))
    assert set(response.tensors) == {"generated_text", "generated_tokens", "prompt_tokens", "finish_reason"}
