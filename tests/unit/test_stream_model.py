"""triton_vlm.backend.stream_model and its response loop: what the engine model's responses carry, and how it
unloads (Triton's utils faked)."""

from __future__ import annotations

import importlib
import itertools
import json
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from triton_vlm._protocol.results import Output, parse_output
from triton_vlm._protocol.wire import Choice, TokenLogprob, TopLogprob
from triton_vlm.engine import RequestOutput
from triton_vlm.errors import GenerationError
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.models.kosmos2 import grounded_entities
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import SamplingParams
from triton_vlm.sampling import TokenLogprob as SampledLogprob

from .helpers import spy_detokenize
from .test_backend import FakeMetric, fake_pb_utils
from .test_protocol import FakeResult

#: Every module that imports Triton's utils, imported again over the fake.
MODULES = ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics",
           "triton_vlm.backend.requests", "triton_vlm.backend.stream_requests", "triton_vlm.backend.responses",
           "triton_vlm.backend.batched_tasks", "triton_vlm.backend.engine_service",
           "triton_vlm.backend.stream_model")
PROMPT = "<grounding>An image of"


def stream_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The stream model's modules over a fake ``triton_python_backend_utils``, by their short names."""
    utils = fake_pb_utils()
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield SimpleNamespace(**{name.rsplit(".", 1)[1]: importlib.import_module(name) for name in MODULES[1:]})
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def stream_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    yield from stream_backend(monkeypatch)


def grounded_answer(processor: Any) -> list[int]:
    """Token ids of ``<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>``."""
    tokenizer = processor.tokenizer
    tags = tokenizer.convert_tokens_to_ids
    return [tags("<phrase>"), *tokenizer(" a dog", add_special_tokens=False).input_ids,
            *tags(["</phrase>", "<object>", "<patch_index_0044>", "<patch_index_0863>", "</object>"])]


def delivering_model(module: Any, runtime: VLMRuntime, extra_outputs: dict[str, str],
                     stream_interval: int = 1) -> Any:
    """The stream model's response loop alone, its thread not started."""
    metrics = SimpleNamespace(observe_request=lambda *args, phases=None: None, request_errors=FakeMetric())
    loop = module.responses.ResponseLoop(runtime, metrics, None, extra_outputs)
    loop.stream_interval = stream_interval
    return loop


def recording_sender() -> tuple[Any, list[tuple[Any, int]]]:
    """A response sender that records (response, flags)."""
    sent: list[tuple[Any, int]] = []
    return SimpleNamespace(send=lambda response=None, flags=0: sent.append((response, flags))), sent


def recording_state(module: Any, token_ids: list[int]) -> tuple[Any, list[tuple[Any, int]]]:
    """The one choice of a streamed request's state, whose sender records (response, flags)."""
    sender, sent = recording_sender()
    request = module.stream_requests.OpenRequest(None, sender, 0.0, release=lambda: None, request_id="r1")
    generation = GenerationRequest(images=(Image.new("RGB", (64, 48)),), prompt=PROMPT, params=SamplingParams())
    (choice,) = module.responses._Stream(request, stream=True, generation=generation).choices
    choice.token_ids.extend(token_ids)
    return choice, sent


def finish(module: Any, runtime: VLMRuntime, extra_outputs: dict[str, str], token_ids: list[int]) -> Any:
    """Run the response thread's delivery of a finished request; returns the one response it sent."""
    model = delivering_model(module, runtime, extra_outputs)
    choice, sent = recording_state(module, token_ids)
    model._deliver(choice, RequestOutput("r1", (), True, "stop", prompt_tokens=70, generated_tokens=len(token_ids)))
    (response, flags), = sent
    assert flags == module.stream_requests.FINAL
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
    assert set(response.tensors) == {"generated_text", "generated_tokens", "prompt_tokens", "finish_reason",
                                     "token_logprobs", "choices", "index", "cached_tokens"}  # no entities


def test_the_clients_read_an_answer_s_logprobs_and_choices_as_the_backend_wrote_them(stream_model: Any) -> None:
    """A whole answer of n=2 with logprobs, from the backend's response tensors to the clients' typed
    :class:`Output`: both sides go through ``_protocol.wire``, tokens named by ``token_text``."""
    token_text = {3: "A", 4: " cat", 5: "B"}.__getitem__
    second = GenerationOutput(text="B", token_ids=(5,), prompt_tokens=9, finish_reason="length",
                              logprobs=(SampledLogprob(5, -0.5, ((5, -0.5), (3, -1.0))),))
    output = GenerationOutput(text="A cat", token_ids=(3, 4), prompt_tokens=9, finish_reason="stop",
                              logprobs=(SampledLogprob(3, -0.25), SampledLogprob(4, -0.75, ((4, -0.75),))),
                              choices=(second,))
    metrics = SimpleNamespace(observe_request=lambda *args, phases=None: None)
    response = stream_model.python_model.answer_response(metrics, {}, output, 0.0, token_text)
    assert parse_output(FakeResult(response.tensors)) == Output(
        "A cat", 2, 9, "stop",
        logprobs=(TokenLogprob(3, "A", -0.25), TokenLogprob(4, " cat", -0.75, (TopLogprob(4, " cat", -0.75),))),
        choices=(Choice(1, "B", "length", 1,
                        (TokenLogprob(5, "B", -0.5, (TopLogprob(5, "B", -0.5), TopLogprob(3, "A", -1.0))),)),))


def stream_through(module: Any, runtime: VLMRuntime, ids: list[int], interval: int,
                   stop: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """Deliver ``ids`` one token a step, as the engine's outputs come; the (text, generated_tokens, flags) sent."""
    model = delivering_model(module, runtime, {}, interval)
    choice, sent = recording_state(module, [])
    choice.state.stop = stop
    for count, token in enumerate(ids, start=1):
        choice.token_ids.append(token)
        last = count == len(ids)
        model._deliver(choice, RequestOutput("r1", (token,), last, "length" if last else None, prompt_tokens=5,
                                            generated_tokens=count))
    return [(r.tensors["generated_text"][0][0].decode(), int(r.tensors["generated_tokens"][0][0]), flags)
            for r, flags in sent]


def test_deltas_go_out_every_stream_interval_tokens_after_the_first(stream_model: Any,
                                                                    llava_runtime: VLMRuntime) -> None:
    tokenizer = llava_runtime.ensure_loaded().processor.tokenizer
    ids = tokenizer(" one two three four five six seven eight nine ten", add_special_tokens=False).input_ids
    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    sent = {interval: stream_through(stream_model, llava_runtime, ids, interval) for interval in (1, 3, 100)}
    for interval, pieces in sent.items():
        # Nothing lost or repeated: the pieces make the whole answer, and exactly the last is FINAL.
        assert "".join(text for text, _, _ in pieces) == answer
        assert [flags for _, _, flags in pieces] == [0] * (len(pieces) - 1) + [stream_model.stream_requests.FINAL]
        counts = [tokens for _, tokens, _ in pieces[:-1]]
        assert counts[0] == 1  # the first piece at once (time to first token)
        assert all(later - earlier >= interval for earlier, later in itertools.pairwise(counts))
    # One piece a token, but for tokens that add no text of their own (a lone space is held until a word follows).
    assert len(ids) - 3 <= len(sent[1]) <= len(ids)
    assert len(sent[3]) <= 2 + (len(ids) - 1) // 3 < len(sent[1])
    assert len(sent[100]) == 2  # the first token, then everything else with the end


#: The tiny smolvlm's greedy answer to the sample image ("What is this?", 12 tokens): byte tokens <0x75> ("u", valid
#: alone) and <0xA0> make one run of bytes that is no UTF-8, which the tokenizer turns into U+FFFD, "u" included.
SMOLVLM_ANSWER = [240, 401, 424, 575, 139, 553, 120, 163, 120, 213, 227, 540]


def test_a_stream_sends_no_text_that_a_later_byte_token_changes(stream_model: Any,
                                                                 smolvlm_runtime: VLMRuntime) -> None:
    processor = smolvlm_runtime.ensure_loaded().processor
    answer = smolvlm_runtime.family.decode_text(processor, SMOLVLM_ANSWER)
    assert "u" not in answer and answer.count("\ufffd") == 7  # the premise: 'u' is one of the bytes of a bad run
    pieces = stream_through(stream_model, smolvlm_runtime, SMOLVLM_ANSWER, 1)
    assert "".join(text for text, _, _ in pieces) == answer
    assert len(pieces) >= 4  # still a stream: the words before the run went out as they came


@pytest.mark.parametrize("stop", [(), ("never in it", "x")])
def test_a_long_stream_decodes_a_few_tokens_a_delta(stream_model: Any, llava_runtime: VLMRuntime,
                                                     monkeypatch: pytest.MonkeyPatch, stop: tuple[str, ...]) -> None:
    """Each delta decodes a short window (triton_vlm.detokenizer), not the whole answer so far: O(n) tokenizer
    work per answer instead of O(n^2), also where stop strings are looked for at every output. The pieces still
    make exactly the whole answer's text."""
    tokenizer = llava_runtime.ensure_loaded().processor.tokenizer
    words = " ".join(f"word{i % 37} café, 日本" for i in range(120))
    ids = tokenizer(words, add_special_tokens=False).input_ids
    sizes = spy_detokenize(monkeypatch, llava_runtime.family)
    pieces = stream_through(stream_model, llava_runtime, ids, 1, stop)
    assert "".join(text for text, _, _ in pieces) == tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert len(ids) > 500 and len(pieces) > len(ids) / 4
    assert sizes[-1] == len(ids)  # the final answer: one decode of it all
    assert sum(sizes[:-1]) < 12 * len(ids)  # a whole decode per delta: ~len(ids)^2 / 2


def test_finalize_stops_its_threads_and_names_one_that_does_not_stop_in_time(
        stream_model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Triton exits 1 when a model takes past its 30 s exit timeout to unload: finalize waits a bounded time for
    the engine service with its engine, the response loop and the batched tasks, and says which did not stop."""
    import logging
    import threading
    import time

    from triton_vlm.engine.engine import EngineStats
    from triton_vlm.errors import GenerationError

    monkeypatch.setattr(stream_model.stream_model, "FINALIZE_WAIT_S", 0.2)
    release = threading.Event()

    class Engine:
        """Its thread ignores shutdown until released, as a stuck engine step would."""

        stats = EngineStats()

        def __init__(self) -> None:
            self.thread = threading.Thread(target=release.wait, daemon=True)
            self.thread.start()

        def shutdown(self, timeout: float) -> bool:
            self.thread.join(timeout)
            return not self.thread.is_alive()

    def stuck_generate(requests: list[Any]) -> list[Any]:
        release.wait()
        return [GenerationError("released")] * len(requests)

    settings = SimpleNamespace(model_name="llava_stream", engine=SimpleNamespace(stream_interval=1))
    runtime = SimpleNamespace(settings=settings, generate=stuck_generate, loaded=None)
    metrics = SimpleNamespace(request_errors=FakeMetric(), loaded=FakeMetric(), load_failures=FakeMetric())
    model = object.__new__(stream_model.stream_model.TritonVLMStreamModel)
    model.model_name = "llava_stream"
    model.responses = stream_model.responses.ResponseLoop(runtime, metrics, None, {}).start()
    model.tasks = stream_model.batched_tasks.BatchedTasks(runtime, metrics, {}).start()
    model.service = stream_model.engine_service.EngineService(runtime, metrics, model.responses, model.tasks,
                                                              build=Engine).start()
    model.service.preload()  # the engine is up
    sender, sent = recording_sender()
    model.tasks.submit(stream_model.stream_requests.OpenRequest(None, sender, 0.0, release=lambda: None), None)
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="triton_vlm"):
        model.finalize()
    assert time.monotonic() - began < 2.0
    assert not model.responses._thread.is_alive() and not model.service._thread.is_alive()
    messages = [r.getMessage() for r in caplog.records]
    assert "model llava_stream: the engine thread, thread triton-vlm-tasks still running at unload" in messages
    assert any(m.startswith("model llava_stream unloaded in ") for m in messages)
    release.set()


def test_engine_shutdown_reports_whether_its_thread_stopped() -> None:
    from tests.unit.helpers import load_tiny

    from triton_vlm.engine import EngineConfig, LLMEngine

    family, model, processor = load_tiny("llava")
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=256, max_num_seqs=2)).start()
    assert engine.shutdown(timeout=10) is True
    assert engine.shutdown(timeout=10) is True  # nothing left to stop


@pytest.mark.parametrize(("text", "stop"), [
    (" one two three four five six seven", "ree fou"),  # starts inside "three", ends inside "four": spans tokens
    (" café naïve — 日本語の文 🙂 done", "語の文 🙂"),  # over byte tokens (the tiny tokenizer has no merges for them)
])
def test_a_stop_string_spanning_tokens_is_never_streamed_and_aborts_the_engine_request(
        stream_model: Any, llava_runtime: VLMRuntime, text: str, stop: str) -> None:
    tokenizer = llava_runtime.ensure_loaded().processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    model = delivering_model(stream_model, llava_runtime, {}, 1)
    aborted: list[tuple[Any, ...]] = []
    model._engine = SimpleNamespace(abort=lambda *args: aborted.append(args))
    choice, sent = recording_state(stream_model, [])
    choice.state.stop = (stop,)
    for count, token in enumerate(ids, start=1):
        choice.token_ids.append(token)
        out = model._deliver(choice, RequestOutput("r1", (token,), False, None, prompt_tokens=5,
                                                  generated_tokens=count))
        pieces = "".join(r.tensors["generated_text"][0][0].decode() for r, _ in sent)
        # Never a character of the stop string, not even the start of it while it could still be one.
        assert answer.startswith(pieces) and len(pieces) <= answer.index(stop)
        if out.finished:
            break
    assert out.finished and out.finish_reason == "stop" and aborted == [("r1", 0)]  # the choice that stopped
    assert "".join(r.tensors["generated_text"][0][0].decode() for r, _ in sent) == answer[:answer.index(stop)]
    last, flags = sent[-1]
    assert flags == stream_model.stream_requests.FINAL and last.tensors["finish_reason"][0][0].decode() == "stop"


def test_batched_tasks_end_every_request_even_when_the_runtime_answers_too_few(stream_model: Any) -> None:
    """A batch whose results do not line up with its requests still ends each request FINAL with an error, and the
    thread goes on serving: a request left open keeps Triton from unloading the model at shutdown."""
    import time

    calls: list[int] = []

    def generate(requests: list[Any]) -> list[Any]:
        calls.append(len(requests))
        return [] if len(calls) == 1 else [GenerationError("second batch")] * len(requests)

    runtime = SimpleNamespace(generate=generate)
    metrics = SimpleNamespace(request_errors=FakeMetric())
    tasks = stream_model.batched_tasks.BatchedTasks(runtime, metrics, {})
    senders = [recording_sender() for _ in range(3)]
    requests = [stream_model.stream_requests.OpenRequest(None, sender, 0.0, release=lambda: None)
                for sender, _ in senders]
    for request in requests[:2]:
        tasks.submit(request, None)
    tasks.start()
    deadline = time.monotonic() + 10
    while not all(request.ended for request in requests[:2]) and time.monotonic() < deadline:
        time.sleep(0.01)
    tasks.submit(requests[2], None)  # the thread is still there for the next batch
    assert tasks.stop(10)
    final = stream_model.stream_requests.FINAL
    for request, (_, sent) in zip(requests, senders, strict=True):
        assert request.ended and len(sent) == 1 and sent[0][1] == final and sent[0][0] is not None


def test_an_ended_request_lets_go_of_its_response_sender(stream_model: Any) -> None:
    """Triton's response sender holds the model (through its response factory): a request that keeps it after its
    FINAL keeps the model from unloading, and the server from stopping. Ending it drops the sender at once, whatever
    else (a reference cycle, a task) still holds the request; the request then reads as cancelled."""
    import gc
    import weakref

    OpenRequest, final = stream_model.stream_requests.OpenRequest, stream_model.stream_requests.FINAL

    class Sender:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send(self, response: Any = None, flags: int = 0) -> None:
            self.sent.append((response, flags))

        def is_cancelled(self) -> bool:
            return False

    for response in (None, "an answer"):
        sender = Sender()
        alive = weakref.ref(sender)
        request = OpenRequest("triton request", sender, 0.0, release=lambda: None)
        held = [request]  # whatever still holds the request after it ended
        request.finish(response)
        assert sender.sent == [(response, final)]
        del sender
        gc.disable()  # not left to the cycle collector
        try:
            assert alive() is None and held[0].triton_request is None
        finally:
            gc.enable()
        assert request.is_cancelled is not None and request.is_cancelled()
        request.finish("again")  # ends once; nothing is sent to a sender it no longer has
