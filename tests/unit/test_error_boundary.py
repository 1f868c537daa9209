"""The backend models' error boundary: whatever one request's work raises (CUDA out of memory, a processor error, a
bug) becomes that request's error response; the other requests of its batch are answered and the model goes on.
Also the stream model's engine service: the engine is built on its own thread, never on Triton's execute thread.
(Triton's utils faked.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from triton_vlm.engine import EngineRequest, RequestOutput
from triton_vlm.engine.engine import EngineStats
from triton_vlm.errors import ModelUnavailableError
from triton_vlm.runtime import VLMRuntime

from .helpers import image_bytes
from .test_backend import request as tensors
from .test_stream_model import stream_backend

IMAGE = image_bytes(30, 20, seed=4)
ANSWER = " a red house by the sea"
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.11 GiB total capacity)"


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    yield from stream_backend(monkeypatch)


class Sender:
    """Triton's response sender: records (response, flags); ``final()`` waits for the FINAL one."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.done = threading.Event()

    def send(self, response: Any = None, flags: int = 0) -> None:
        assert not self.done.is_set(), "a response after the final one"
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self) -> bool:
        return False

    def final(self, timeout: float = 60.0) -> Any:
        assert self.done.wait(timeout), f"no final response in {timeout}s; sent {self.sent}"
        return self.sent[-1][0]

    def text(self) -> str:
        return "".join(r.tensors["generated_text"][0][0].decode() for r, _ in self.sent if r is not None and not r.error)


class Request(dict):
    """Triton's ``InferenceRequest``: input tensors by name, a response sender, an id."""

    def __init__(self, prompt: str, max_tokens: int = 3, image: bytes = IMAGE) -> None:
        super().__init__(tensors(image, prompt.encode(), max_tokens=max_tokens))
        self.sender = Sender()

    def get_response_sender(self) -> Sender:
        return self.sender

    def request_id(self) -> str:
        return ""


class SteppingEngine:
    """An engine without a thread of its own: ``submit`` runs the request's steps at once on the caller's thread.
    The second step of a request whose prompt says "oom" raises what PyTorch raises when the GPU is full. It has
    no scheduler: its stats are all the backend may read."""

    built_on: list[str] = []

    def __init__(self, family: Any, model: Any, processor: Any, config: Any = None) -> None:
        type(self).built_on.append(threading.current_thread().name)
        self.answer = processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
        self.stats = EngineStats()
        self.stats.running = 3  # sequences running, as the engine thread publishes it
        self.runner = SimpleNamespace(warmup=lambda: None)
        self.submitted: list[str] = []

    def start(self) -> SteppingEngine:
        return self

    def accepts(self, task: str | None) -> bool:
        return True

    def prepare(self, image: Any, prompt: str, params: Any, on_output: Any, *, request_id: str | None = None,
                ignore_eos: bool | None = None) -> EngineRequest:
        return EngineRequest(request_id or "req", [1] * 7, params, on_output, mm_inputs={"prompt": prompt})

    def submit(self, request: EngineRequest) -> None:
        self.submitted.append(request.mm_inputs["prompt"])
        tokens = self.answer[:request.params.max_tokens]
        for count, token in enumerate(tokens, start=1):
            if count == 2 and "oom" in request.mm_inputs["prompt"]:
                raise RuntimeError(OOM)
            last = count == len(tokens)
            for index in range(request.params.n):  # each choice its token of the step, as the engine runs them
                request.on_output(RequestOutput(request.request_id, (token,), last, "length" if last else None, 7,
                                                count, index=index))

    def abort(self, request_id: str, index: int | None = None) -> None:
        pass

    def shutdown(self, timeout: float = 30.0) -> bool:
        return True


def config(parameters: dict[str, str]) -> dict[str, str]:
    """Triton's ``initialize`` arguments for a CPU instance of ``llava_stream``."""
    parameters = {"tiny": "true", "max_model_len": "512", "max_num_seqs": "4", **parameters}
    return {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}),
            "model_name": "llava_stream", "model_instance_kind": "CPU", "model_instance_device_id": "0"}


def stream_model(backend: SimpleNamespace, runtime: VLMRuntime | None = None, **parameters: str) -> Any:
    """An initialized llava_stream model; with ``runtime``, serving that runtime's loaded weights."""
    class Model(backend.stream_model.TritonVLMStreamModel):
        family = "llava"

    model = Model()
    model.initialize(config(parameters))
    if runtime is not None:
        model.runtime._loaded = runtime.ensure_loaded()
    return model


def expected_text(runtime: VLMRuntime, tokens: int) -> str:
    processor = runtime.ensure_loaded().processor
    return runtime.family.decode_text(processor, processor.tokenizer(ANSWER, add_special_tokens=False).input_ids[:tokens])


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def execute_soon(model: Any, requests: list[Request]) -> float:
    """Call execute on a thread of its own (Triton's), failing if it does not return within 2 s; its seconds."""
    began = time.monotonic()
    caller = threading.Thread(target=model.execute, args=(requests,), daemon=True)
    caller.start()
    caller.join(timeout=2.0)
    assert not caller.is_alive(), "execute blocked (it must only queue requests)"
    return time.monotonic() - began


# -- the stream model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_step_out_of_gpu_memory_fails_its_request_and_the_rest_of_the_batch_is_answered(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    """With the requests prepared on the service's thread, and by a pool of workers."""
    monkeypatch.setattr(backend.engine_service, "LLMEngine", SteppingEngine)
    model = stream_model(backend, llava_runtime, prepare_workers=workers)
    batch = [Request("What is this?"), Request("oom: what is this?"), Request("And this?")]
    assert model.execute(batch) is None
    first, failed, last = (r.sender.final() for r in batch)
    assert failed.error is not None and failed.error.code == "INTERNAL"
    assert OOM in failed.error.message
    for ok, answered in ((first, batch[0]), (last, batch[2])):
        assert ok.error is None and ok.tensors["finish_reason"][0][0] == b"length"
        assert answered.sender.text() == expected_text(llava_runtime, 3)
    later = Request("Later?", max_tokens=2)
    model.execute([later])
    assert later.sender.final().error is None and later.sender.text() == expected_text(llava_runtime, 2)
    assert wait_until(lambda: model.admission.open == 0)  # every place in the bound given back
    assert model.metrics.request_errors.value == 1
    model.finalize()


def test_a_request_for_n_choices_runs_on_the_engine(backend: SimpleNamespace, llava_runtime: VLMRuntime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine runs n choices itself: the stream model hands such a request to it (not to its batched loop), and
    the choices' pieces stream with their index, each ending with its finish reason, the last one FINAL."""
    monkeypatch.setattr(backend.engine_service, "LLMEngine", SteppingEngine)
    model = stream_model(backend, llava_runtime)
    monkeypatch.setattr(model.tasks, "submit", lambda *args: pytest.fail("sent to the batched loop"))
    asked = Request("What is this?")
    asked["n"] = np.array([[3]], dtype=np.int32)
    model.execute([asked])
    asked.sender.final()
    assert model.service.engine.submitted == ["What is this?"]
    pieces = [(int(r.tensors["index"][0][0]), r.tensors["finish_reason"][0][0].decode()) for r, _ in asked.sender.sent]
    assert sorted(index for index, finish in pieces if finish) == [0, 1, 2]
    assert asked.sender.sent[-1][1] and sum(1 for _, flags in asked.sender.sent if flags) == 1
    model.finalize()


class ExplodingProcessor:
    """The real processor, but one that raises on a prompt that says "explode" (as a processor does on inputs it
    cannot handle)."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any("explode" in text for text in kwargs.get("text") or []):
            raise ValueError("Image features and image tokens do not match: tokens: 0, features 576")
        return self._processor(*args, **kwargs)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_processor_error_in_prepare_fails_its_request_and_the_rest_of_the_batch_is_answered(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, workers: str) -> None:
    """On the real engine: the processor runs inside ``engine.prepare`` (on the service's thread, or a worker's)."""
    model = stream_model(backend, prepare_workers=workers)
    loaded = llava_runtime.ensure_loaded()
    model.runtime._loaded = replace(loaded, processor=ExplodingProcessor(loaded.processor))
    # Its own image: an image the engine processed lately skips the processor (only its text is tokenized).
    batch = [Request("What is this?", 4), Request("explode, please", 4, image_bytes(30, 20, seed=5)),
             Request("Describe it.", 4)]
    model.execute(batch)
    first, failed, last = (r.sender.final() for r in batch)
    assert failed.error.code == "INVALID_ARG" and "request rejected by the model's processor" in failed.error.message
    for response, answered in ((first, batch[0]), (last, batch[2])):
        assert response.error is None
        prompt = answered["prompt"][0][0].decode()
        (direct,) = llava_runtime.generate([llava_runtime.make_request(IMAGE, prompt, max_tokens=4)])
        assert answered.sender.text() == direct.text  # type: ignore[union-attr]
    later = Request("Later?", 2)
    model.execute([later])
    assert later.sender.final().error is None
    model.finalize()


def test_the_engine_builds_on_its_own_thread_while_requests_wait_in_order(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """execute returns at once while the engine builds; the requests that arrived meanwhile are served, in the
    order they came, once it is ready (one prepare worker: several may finish out of order)."""
    gate = threading.Event()

    class SlowToBuild(SteppingEngine):
        built_on: list[str] = []
        instances: list[SteppingEngine] = []

        def __init__(self, *args: Any) -> None:
            gate.wait(30)  # weights, engine, CUDA graphs: a while
            super().__init__(*args)
            type(self).instances.append(self)

    monkeypatch.setattr(backend.engine_service, "LLMEngine", SlowToBuild)
    model = stream_model(backend, llava_runtime, prepare_workers="1")
    batches = [[Request("one?"), Request("two?")], [Request("three?")]]
    for batch in batches:
        assert execute_soon(model, batch) < 1.0
    assert not any(r.sender.done.is_set() for batch in batches for r in batch)
    gate.set()
    assert all(r.sender.final().error is None for batch in batches for r in batch)
    assert SlowToBuild.built_on == ["triton-vlm-engine-service"]
    assert SlowToBuild.instances[0].submitted == ["one?", "two?", "three?"]
    model.finalize()


def test_requests_are_prepared_side_by_side_once_the_engine_is_built(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """With prepare_workers 3, a burst is prepared by several workers at once: three prepares that each wait until
    all three are inside meet (one after another, the first would wait alone and fail). The engine is built once,
    on the service's thread, by the first request."""
    meeting = threading.Barrier(3, timeout=10)
    prepared_on: list[str] = []

    class Meeting(SteppingEngine):
        built_on: list[str] = []

        def prepare(self, image: Any, prompt: str, params: Any, on_output: Any, **kwargs: Any) -> EngineRequest:
            if "meet" in prompt:
                prepared_on.append(threading.current_thread().name)
                meeting.wait()
            return super().prepare(image, prompt, params, on_output, **kwargs)

    monkeypatch.setattr(backend.engine_service, "LLMEngine", Meeting)
    model = stream_model(backend, llava_runtime, prepare_workers="3")
    first = Request("What is this?")
    model.execute([first])
    assert first.sender.final().error is None
    burst = [Request(f"meet {i}?") for i in range(3)]
    model.execute(burst)
    assert all(r.sender.final().error is None for r in burst)
    assert all(r.sender.text() == expected_text(llava_runtime, 3) for r in burst)
    assert len(set(prepared_on)) == 3 and all(name.startswith("triton-vlm-prepare") for name in prepared_on)
    assert Meeting.built_on == ["triton-vlm-engine-service"]
    model.finalize()


def test_finalize_waits_for_the_prepare_workers_and_names_a_request_stuck_there(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    release = threading.Event()
    entered = threading.Event()

    class StuckInPrepare(SteppingEngine):
        def prepare(self, image: Any, prompt: str, params: Any, on_output: Any, **kwargs: Any) -> EngineRequest:
            if "stuck" in prompt:
                entered.set()
                release.wait(30)
            return super().prepare(image, prompt, params, on_output, **kwargs)

    monkeypatch.setattr(backend.engine_service, "LLMEngine", StuckInPrepare)
    monkeypatch.setattr(backend.stream_model, "FINALIZE_WAIT_S", 0.3)
    model = stream_model(backend, llava_runtime, prepare_workers="2")
    first = Request("What is this?")
    model.execute([first])
    assert first.sender.final().error is None
    stuck = Request("stuck?")
    model.execute([stuck])
    assert entered.wait(10)
    with caplog.at_level(logging.INFO, logger="triton_vlm"):
        model.finalize()
    assert any("1 request(s) in the prepare workers" in r.getMessage() for r in caplog.records)
    release.set()
    error = stuck.sender.final().error  # prepared once the model stopped: refused, not lost
    assert error.code == "UNAVAILABLE" and "is unloading" in error.message


def test_an_engine_that_fails_to_build_answers_every_waiting_request_then_builds_for_the_next(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA out of memory while the engine builds (e.g. capturing its graphs) is a RuntimeError: every request
    waiting for that build gets UNAVAILABLE, and the next request tries again."""
    gate = threading.Event()
    attempts: list[int] = []

    class OutOfMemoryOnce(SteppingEngine):
        def __init__(self, *args: Any) -> None:
            attempts.append(1)
            gate.wait(30)
            if len(attempts) == 1:
                raise RuntimeError(OOM)
            super().__init__(*args)

    monkeypatch.setattr(backend.engine_service, "LLMEngine", OutOfMemoryOnce)
    model = stream_model(backend, llava_runtime)
    batch = [Request("one?"), Request("two?"), Request("three?")]
    execute_soon(model, batch)
    gate.set()
    for waiting in batch:
        error = waiting.sender.final().error
        assert error.code == "UNAVAILABLE" and "engine unavailable" in error.message and OOM in error.message
    assert model.metrics.load_failures.value == 1 and model.metrics.loaded.value == 0
    later = Request("Later?")
    model.execute([later])
    assert later.sender.final().error is None and len(attempts) == 2
    assert model.metrics.loaded.value == 1
    model.finalize()


def test_preload_builds_on_the_service_thread_and_a_failed_build_fails_the_load(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    processor = llava_runtime.ensure_loaded().processor
    threads: list[str] = []

    def build(runtime: VLMRuntime) -> SteppingEngine:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            raise RuntimeError(OOM)
        return SteppingEngine(None, None, processor)

    monkeypatch.setattr(backend.stream_model, "build_engine", build)
    with pytest.raises(ModelUnavailableError, match="engine unavailable: RuntimeError: CUDA out of memory"):
        stream_model(backend, preload="true")
    model = stream_model(backend, preload="true")
    assert threads == ["triton-vlm-engine-service"] * 2
    model.runtime._loaded = llava_runtime.ensure_loaded()
    served = Request("What is this?")
    model.execute([served])
    assert served.sender.final().error is None
    model.finalize()


def test_engine_metrics_come_from_its_published_stats(backend: SimpleNamespace, llava_runtime: VLMRuntime,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The response loop samples the batch size from the engine's stats (the fake has no scheduler to read)."""
    monkeypatch.setattr(backend.engine_service, "LLMEngine", SteppingEngine)
    model = stream_model(backend, llava_runtime)
    served = Request("What is this?")
    model.execute([served])
    assert served.sender.final().error is None
    assert wait_until(lambda: model.metrics.batch_size.value == 3)
    model.finalize()


def test_an_injected_fault_fails_only_the_marked_request(backend: SimpleNamespace, llava_runtime: VLMRuntime,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The test-only hook (TRITON_VLM_INJECT_FAULTS) the integration tests use on the real server."""
    monkeypatch.setenv("TRITON_VLM_INJECT_FAULTS", "prepare=fault-here")
    monkeypatch.setattr(backend.engine_service, "LLMEngine", SteppingEngine)
    model = stream_model(backend, llava_runtime)
    batch = [Request("What is this?"), Request("fault-here: what is this?")]
    model.execute(batch)
    served, failed = (r.sender.final() for r in batch)
    assert served.error is None
    assert failed.error.code == "INTERNAL" and "fault injected at 'prepare'" in failed.error.message
    model.finalize()


def test_fault_injection_is_off_by_default_and_checks_its_setting(backend: SimpleNamespace) -> None:
    faults = backend.engine_service.FaultInjection
    faults.from_env({}).check("prepare", "anything")  # nothing injected
    armed = faults.from_env({"TRITON_VLM_INJECT_FAULTS": "parse=boom, prepare=bang"})
    armed.check("parse", "a bang")  # another point's marker
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        armed.check("parse", "a boom")
    with pytest.raises(ValueError, match="TRITON_VLM_INJECT_FAULTS"):
        faults.from_env({"TRITON_VLM_INJECT_FAULTS": "step=boom"})


# -- the batched model ----------------------------------------------------------------------------------------
def batched_model(backend: SimpleNamespace, runtime: VLMRuntime) -> Any:
    class Model(backend.python_model.TritonVLMModel):
        family = "llava"

    model = Model()
    model.initialize({**config({}), "model_name": "llava"})
    model.runtime._loaded = runtime.ensure_loaded()
    return model


def test_the_batched_model_answers_the_rest_of_a_batch_when_one_request_raises(
        backend: SimpleNamespace, llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    model = batched_model(backend, llava_runtime)
    parse = backend.python_model.parse_request

    def parse_or_fail(request: Any, runtime: VLMRuntime) -> Any:
        if b"oom" in request["prompt"][0][0]:
            raise RuntimeError(OOM)  # e.g. an image moved to a full GPU
        return parse(request, runtime)

    monkeypatch.setattr(backend.python_model, "parse_request", parse_or_fail)
    batch = [Request("What is this?"), Request("oom?"), Request("<image> again")]
    served, failed, invalid = model.execute(batch)
    assert served.error is None and int(served.tensors["generated_tokens"][0, 0]) == 3
    assert failed.error.code == "INTERNAL" and OOM in failed.error.message
    assert invalid.error.code == "INVALID_ARG"


def test_the_batched_model_answers_every_request_when_its_generation_raises(
        backend: SimpleNamespace, llava_runtime: VLMRuntime) -> None:
    model = batched_model(backend, llava_runtime)

    def out_of_memory(requests: list[Any]) -> list[Any]:
        raise RuntimeError(OOM)

    model.runtime.generate = out_of_memory
    responses = model.execute([Request("What is this?"), Request("And this?"), Request("<image> again")])
    assert [r.error.code for r in responses] == ["INTERNAL", "INTERNAL", "INVALID_ARG"]
    assert all(OOM in r.error.message for r in responses[:2])
    del model.runtime.generate  # the model goes on
    (served,) = model.execute([Request("What is this?")])
    assert served.error is None and np.asarray(served.tensors["generated_tokens"]).item() == 3
