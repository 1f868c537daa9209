"""triton_vlm.backend.responses with ``n`` choices: the response loop's thread, fed engine outputs of several choices
interleaved (as the engine hands them out), answers each request with exactly one FINAL response (Triton's utils
faked; the tiny llava's tokenizer)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from triton_vlm._protocol.results import Output, parse_output
from triton_vlm._protocol.wire import Choice
from triton_vlm.engine import RequestOutput
from triton_vlm.engine.engine import EngineStats
from triton_vlm.errors import GenerationError
from triton_vlm.observability.phases import FIRST_TOKEN_PHASES
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import SamplingParams

from .test_backend import FakeMetric
from .test_protocol import FakeResult
from .test_stream_model import stream_backend

TEXTS = (" one two three four", " red green blue", " sun moon star sky rain")
PROMPT_TOKENS = 40
#: Each choice's cached prompt positions, as the engine reports them: the later choices copied the first's prefill.
CACHED = (16, 32, 32)


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    yield from stream_backend(monkeypatch)


class ScriptedInbox:
    """The loop's inbox, fed one step at a time: ``get`` starts the next step, ``get_nowait`` takes the rest of it.
    What is put while the loop runs (the fake engine's abort outputs) comes as a step of its own, next; once the
    script is done the loop gets ``None`` (shutting down: every request still open ends FINAL)."""

    def __init__(self, steps: list[list[Any]]) -> None:
        self.steps = [list(step) for step in steps]
        self.current: list[Any] = []
        self.later: list[Any] = []

    def put(self, message: Any) -> None:
        self.later.append(message)

    def get(self, timeout: float | None = None) -> Any:
        if self.later:
            self.steps.insert(0, self.later)
            self.later = []
        if not self.steps:
            return None
        self.current = self.steps.pop(0)
        if not self.current:
            raise queue.Empty
        return self.current.pop(0)

    def get_nowait(self) -> Any:
        if not self.current:
            raise queue.Empty
        return self.current.pop(0)


class FakeEngine:
    """What the loop uses of the engine: its stats, and ``abort``, which ends the choices still running with an
    "abort" output each (as the engine does)."""

    def __init__(self, loop: Any, n: int) -> None:
        self.stats = EngineStats()
        self.loop = loop
        self.running = set(range(n))
        self.aborts: list[tuple[str, int | None]] = []

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborts.append((request_id, index))
        for i in sorted(self.running):
            if index is None or i == index:
                self.running.discard(i)
                self.loop.put(RequestOutput(request_id, (), True, "abort", PROMPT_TOKENS, 0, index=i))


class Served:
    """One request for ``n`` choices through the loop: the responses it sent (response, flags) and the metrics."""

    def __init__(self, backend: SimpleNamespace, runtime: VLMRuntime, n: int, *, stream: bool = True,
                 stop: tuple[str, ...] = (), cancelled: Callable[[], bool] = lambda: False) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.observed: list[tuple[Any, ...]] = []
        self.final_flag = backend.stream_requests.FINAL
        self.metrics = SimpleNamespace(observe_request=lambda *args, phases=None: self.observed.append((*args, phases)),
                                       request_errors=FakeMetric())
        self.loop = backend.responses.ResponseLoop(runtime, self.metrics, SimpleNamespace(update=lambda stats: None),
                                                   {})
        self.loop.stream_interval = 1
        self.loop._inbox = ScriptedInbox([])
        self.engine = FakeEngine(self.loop, n)
        sender = SimpleNamespace(send=lambda response=None, flags=0: self.sent.append((response, flags)),
                                 is_cancelled=cancelled)
        self.request = backend.stream_requests.OpenRequest(None, sender, 0.0, release=lambda: None, request_id="r1")
        generation = GenerationRequest(images=(), prompt="x", params=SamplingParams(n=n, stop=stop))
        self.loop.open(self.request, self.engine, stream, generation)

    def run(self, steps: list[list[RequestOutput]]) -> None:
        """The loop's thread over ``steps`` (each what the engine handed out between two of the loop's turns)."""
        inbox = self.loop._inbox
        inbox.steps = [inbox.later, *steps]
        inbox.later = []
        self.loop._run()

    def outputs(self) -> list[Output]:
        """What the clients read from each response sent (an error response has no outputs: left out)."""
        return [parse_output(FakeResult(response.tensors)) for response, _ in self.sent
                if response is not None and response.error is None]

    def assert_one_final(self) -> Any:
        """Exactly one FINAL response, the last one sent; returns it."""
        assert [flags for _, flags in self.sent] == [0] * (len(self.sent) - 1) + [self.final_flag]
        assert self.request.ended
        return self.sent[-1][0]


def token_ids(runtime: VLMRuntime) -> list[list[int]]:
    tokenizer = runtime.ensure_loaded().processor.tokenizer
    return [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]


def text_of(runtime: VLMRuntime, ids: list[int]) -> str:
    return runtime.family.decode_text(runtime.ensure_loaded().processor, ids)


def interleaved(ids: list[list[int]], ends: dict[int, str] | None = None) -> list[list[RequestOutput]]:
    """One step per token position: each choice's next token, the last ending it ("length" unless ``ends`` says)."""
    steps: list[list[RequestOutput]] = []
    for position in range(max(map(len, ids))):
        step = []
        for index, tokens in enumerate(ids):
            if position < len(tokens):
                last = position == len(tokens) - 1
                step.append(RequestOutput("r1", (tokens[position],), last,
                                          (ends or {}).get(index, "length") if last else None, PROMPT_TOKENS,
                                          position + 1, cached_tokens=CACHED[index], index=index))
        steps.append(step)
    return steps


def test_streamed_choices_interleave_each_with_its_index_and_the_last_one_ends_final(
        backend: SimpleNamespace, llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)
    served = Served(backend, llava_runtime, 3)
    served.run(interleaved(ids))
    served.assert_one_final()
    outputs = served.outputs()
    for index, tokens in enumerate(ids):
        mine = [o for o in outputs if o.index == index]
        assert "".join(o.text for o in mine) == text_of(llava_runtime, tokens)
        assert [bool(o.finish_reason) for o in mine] == [False] * (len(mine) - 1) + [True]  # its last piece only
        assert (mine[-1].finish_reason, mine[-1].generated_tokens, mine[-1].cached_tokens) == (
            "length", len(tokens), CACHED[index])
    # Interleaved as they came: choice 1 (the shortest) ended before the others' last pieces; choice 2 ends FINAL.
    assert [o.index for o in outputs if o.finish_reason] == [1, 0, 2] and outputs[-1].index == 2
    # The prefix cache's count rides on a choice's last piece alone: the deltas before it leave it out (their cost).
    assert [("cached_tokens" in r.tensors) for r, _ in served.sent] == [bool(o.finish_reason) for o in outputs]
    assert served.engine.aborts == []
    ((_, _, _, generated, prompt, _),) = served.observed
    assert (generated, prompt) == (sum(map(len, ids)), PROMPT_TOKENS)


def test_a_whole_answer_of_n_choices_is_one_response_with_the_others_in_choices(
        backend: SimpleNamespace, llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)
    served = Served(backend, llava_runtime, 3, stream=False)
    served.run(interleaved(ids, ends={1: "stop"}))
    served.assert_one_final()
    (answer,) = served.outputs()
    texts = [text_of(llava_runtime, tokens) for tokens in ids]
    assert answer == Output(texts[0], len(ids[0]), PROMPT_TOKENS, "length", index=0, cached_tokens=CACHED[0],
                            choices=(Choice(1, texts[1], "stop", len(ids[1])),
                                     Choice(2, texts[2], "length", len(ids[2]))))


def test_a_stop_string_ends_its_own_choice_and_aborts_only_that_one(backend: SimpleNamespace,
                                                                     llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)[:2]
    ids[1] = ids[1] * 3  # " red green blue red green blue ...": choice 1 reaches "green" early, and would go on
    served = Served(backend, llava_runtime, 2, stop=("green",))
    served.run(interleaved(ids))
    served.assert_one_final()
    assert served.engine.aborts == [("r1", 1)]  # that choice's decoding only
    outputs = served.outputs()
    stopped = [o for o in outputs if o.index == 1]
    assert "".join(o.text for o in stopped) == "red " and stopped[-1].finish_reason == "stop"  # right before it
    assert [o.finish_reason for o in stopped].count("stop") == 1  # its later tokens and its abort output: dropped
    going_on = [o for o in outputs if o.index == 0]
    assert "".join(o.text for o in going_on) == text_of(llava_runtime, ids[0])
    assert outputs[-1].index == 0 and outputs[-1].finish_reason == "length"


def test_a_cancelled_request_aborts_every_choice_and_ends_final_once(backend: SimpleNamespace,
                                                                   llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)
    served = Served(backend, llava_runtime, 3, cancelled=lambda: True)
    served.run(interleaved(ids))
    assert served.assert_one_final() is None  # the bare FINAL flag: no answer
    assert served.sent == [(None, served.final_flag)] and served.engine.aborts == [("r1", None)]
    assert served.metrics.request_errors.value == 0


def test_an_error_in_one_choice_fails_the_request_once_and_aborts_the_others(backend: SimpleNamespace,
                                                                           llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)
    steps = interleaved(ids)
    # Choice 1 fails at its second token (a failed step fails the rows in it); the others would go on.
    steps[1][1] = RequestOutput("r1", (), True, "error", PROMPT_TOKENS, 1, error=GenerationError("boom"), index=1)
    served = Served(backend, llava_runtime, 3)
    served.run(steps)
    final = served.assert_one_final()
    assert final.error is not None and "boom" in final.error.message
    assert served.engine.aborts == [("r1", None)]  # choices 0 and 2 stop too
    assert served.engine.running == set() and served.metrics.request_errors.value == 1
    # Pieces went out up to the error (the step that failed), none after it.
    assert served.outputs() and max(o.generated_tokens for o in served.outputs()) <= 2


def test_shutting_down_ends_a_request_with_choices_still_running_final_once(backend: SimpleNamespace,
                                                                           llava_runtime: VLMRuntime) -> None:
    ids = token_ids(llava_runtime)
    served = Served(backend, llava_runtime, 3)
    served.run(interleaved(ids)[:2])  # then the loop is asked to stop
    assert served.assert_one_final() is None
    assert {o.index for o in served.outputs()} == {0, 1, 2}


def test_a_streamed_request_reports_the_phases_of_its_first_token(backend: SimpleNamespace,
                                                                   llava_runtime: VLMRuntime) -> None:
    """The engine service's stamps, the engine's (on the first token's output) and the first response's leaving
    split the time to first token; a whole answer, which sends nothing before its end, has no "respond" phase."""
    ids = token_ids(llava_runtime)[0]
    for stream in (True, False):
        served = Served(backend, llava_runtime, 1, stream=stream)
        base = time.perf_counter() - 20.0  # stamps as the service and the engine take them, 20 s ago
        request = served.request
        request.received, request.started, request.parsed, request.prepared = base, base + 0.5, base + 1.5, base + 3.5
        first = RequestOutput("r1", (ids[0],), False, None, PROMPT_TOKENS, 1,
                              first_token_times=(base + 7.5, base + 15.5))
        rest = [RequestOutput("r1", (token,), i == len(ids) - 1, "length" if i == len(ids) - 1 else None,
                              PROMPT_TOKENS, i + 1) for i, token in enumerate(ids) if i]
        served.run([[first], rest])
        after = time.perf_counter()
        ((*_, phases),) = served.observed
        assert {k: round(phases[k], 6) for k in ("wait", "parse", "prepare", "queue", "prefill")} == {
            "wait": 0.5, "parse": 1.0, "prepare": 2.0, "queue": 4.0, "prefill": 8.0}
        if stream:  # the first piece left when the loop ran, 4.5 s and a little after the token
            assert list(phases) == list(FIRST_TOKEN_PHASES)
            assert 4.5 <= phases["respond"] <= after - base - 15.5
        else:
            assert "respond" not in phases
