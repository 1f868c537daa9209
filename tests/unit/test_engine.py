"""triton_vlm.engine.LLMEngine on CPU with the tiny llava: the same tokens as generate_batch under continuous
batching and chunked prefill, seeded sampling, ignore_eos, the threaded mode, abort, context limits and
failed steps."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from triton_vlm.engine import EngineConfig, LLMEngine, RequestOutput
from triton_vlm.engine.request import SequenceStatus
from triton_vlm.engine.scheduler import SchedulerOutput
from triton_vlm.errors import GenerationError, InvalidInputError
from triton_vlm.models.generation import GenerationOutput, generate_batch
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams

from .helpers import rgb_array

#: Six requests: prompt lengths, image sizes and max_tokens all differ.
PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi",
           "two people riding bicycles", "describe the picture in detail please, with all the colours",
           "count: 0 1 2 3 4 5 6 7 8 9 10 100"]
SIZES = [(40, 30), (64, 64), (17, 90), (30, 30), (100, 20), (8, 8)]
MAX_TOKENS = [12, 5, 20, 1, 9, 16]
WAIT = 60.0  # seconds; every engine test finishes in well under one


def image(index: int) -> Image.Image:
    width, height = SIZES[index % len(SIZES)]
    return Image.fromarray(rgb_array(width, height, seed=index))


IMAGES = [image(i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def loaded(llava_runtime: VLMRuntime) -> Any:
    return llava_runtime.ensure_loaded()


def make_engine(loaded: Any, **config: Any) -> LLMEngine:
    return LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(**{"max_model_len": 256, **config}))


def reference(loaded: Any, params: list[SamplingParams], indices: list[int] | None = None) -> list[GenerationOutput]:
    indices = list(range(len(params))) if indices is None else indices
    return generate_batch(loaded.family, loaded.model, loaded.processor, [IMAGES[i] for i in indices],
                          [PROMPTS[i] for i in indices], params)


@pytest.fixture(scope="module")
def greedy_reference(loaded: Any) -> list[GenerationOutput]:
    return reference(loaded, [SamplingParams(max_tokens=m) for m in MAX_TOKENS])


def record_plans(engine: LLMEngine) -> list[dict[str, Any]]:
    """Wrap the scheduler so each step's plan is recorded (which requests prefill how much, which decode)."""
    plans: list[dict[str, Any]] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        plan = schedule()
        if not plan.empty:
            plans.append({
                "admitted": [s.request.request_id for s in plan.admitted],
                "prefill": [(c.seq.request.request_id, c.start, c.length) for c in plan.prefill],
                "decode": [s.request.request_id for s in plan.decode],
                "running": len(engine.scheduler.running),
            })
        return plan

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return plans


class Collector:
    """An ``on_output`` callback: every RequestOutput per request, and an event per finished request."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.finished: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.first_token: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.hooks: list[Callable[[RequestOutput], None]] = []

    def __call__(self, out: RequestOutput) -> None:
        with self.lock:
            self.outputs.setdefault(out.request_id, []).append(out)
        for hook in self.hooks:
            hook(out)
        if out.new_token_ids:
            self.first_token.setdefault(out.request_id, threading.Event()).set()
        if out.finished:
            self.finished.put(out)

    def wait_finished(self, count: int) -> dict[str, RequestOutput]:
        finals = {}
        for _ in range(count):
            out = self.finished.get(timeout=WAIT)
            finals[out.request_id] = out
        return finals

    def tokens(self, request_id: str) -> list[int]:
        return [t for out in self.outputs.get(request_id, []) for t in out.new_token_ids]


@pytest.fixture
def threaded() -> Iterator[list[LLMEngine]]:
    """Engines started in a test are shut down after it, whatever happens."""
    engines: list[LLMEngine] = []
    yield engines
    for engine in engines:
        engine.shutdown()


def ignore(out: RequestOutput) -> None:
    pass


def start(engine: LLMEngine, engines: list[LLMEngine]) -> LLMEngine:
    engines.append(engine)
    return engine.start()


# -- (a) greedy parity with generate_batch --------------------------------------------------------------------
def test_engine_matches_generate_batch_with_continuous_batching(loaded: Any, greedy_reference: list) -> None:
    engine = make_engine(loaded, max_num_seqs=2)
    plans = record_plans(engine)
    items = [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=m)) for i, m in enumerate(MAX_TOKENS)]
    tokens = engine.generate(items)
    assert tokens == [list(r.token_ids) for r in greedy_reference]
    assert [len(t) for t in tokens] == MAX_TOKENS  # the tiny model never says EOS here: max_tokens decides
    # Never more than two at once, and requests joined while others were decoding (not one batch after another).
    assert max(p["running"] for p in plans) == 2
    assert any(p["admitted"] and p["decode"] for p in plans)
    assert sum(len(p["admitted"]) for p in plans) == 6
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()


def test_engine_matches_generate_batch_with_chunked_prefill(loaded: Any, greedy_reference: list) -> None:
    engine = make_engine(loaded, max_num_seqs=8, max_prefill_tokens=16)
    plans = record_plans(engine)
    items = [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=m)) for i, m in enumerate(MAX_TOKENS)]
    assert engine.generate(items) == [list(r.token_ids) for r in greedy_reference]
    # Every step spends at most 16 prompt tokens; prompts (35+ tokens with the image) took several steps each.
    assert all(sum(length for _, _, length in p["prefill"]) <= 16 for p in plans)
    chunks: dict[str, list[tuple[int, int]]] = {}
    for p in plans:
        for request_id, begin, length in p["prefill"]:
            chunks.setdefault(request_id, []).append((begin, length))
    assert len(chunks) == 6
    for request_id, parts in chunks.items():
        assert len(parts) >= 3, request_id
        assert [b for b, _ in parts] == [sum(n for _, n in parts[:k]) for k in range(len(parts))]  # contiguous
    assert any(p["prefill"] and p["decode"] for p in plans)  # decodes kept flowing during prefills
    assert engine.stats.prefill_tokens == sum(n for parts in chunks.values() for _, n in parts)


def test_prompts_ride_along_in_decode_steps_and_change_no_token(loaded: Any, greedy_reference: list,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """llava's decoder runs a step's prompt chunks and its decode rows as one forward (one pass over the weights):
    the tokens stay generate_batch's, greedy and sampled, and separate forwards run only where a step has one kind."""
    engine = make_engine(loaded, max_num_seqs=3, max_prefill_tokens=16)
    assert engine.runner.mixes
    calls: dict[str, int] = {"prefill": 0, "decode": 0, "prefill_and_decode": 0}
    for name in calls:
        original = getattr(engine.runner, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(engine.runner, name, counting)
    plans = record_plans(engine)
    seeded = SamplingParams(max_tokens=5, temperature=0.8, seed=3)
    items = [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=m)) for i, m in enumerate(MAX_TOKENS)]
    assert engine.generate([*items, (IMAGES[0], PROMPTS[0], seeded)]) == [
        *[list(r.token_ids) for r in greedy_reference], list(reference(loaded, [seeded], [0])[0].token_ids)]
    mixed = sum(1 for p in plans if p["prefill"] and p["decode"])
    assert mixed >= 5 and calls["prefill_and_decode"] == mixed
    assert calls["prefill"] == sum(1 for p in plans if p["prefill"] and not p["decode"])
    assert calls["decode"] == sum(1 for p in plans if p["decode"] and not p["prefill"])
    assert engine.stats.seconds["mixed"] > 0


@pytest.mark.parametrize("family_name, config, mixes", [
    ("llava", {}, True), ("llava", {"quantization": "fp8"}, False), ("kosmos2", {}, False), ("moondream2", {}, False)])
def test_only_dense_llama_decoders_mix_prompts_into_decode_steps(family_name: str, config: dict[str, str],
                                                                 mixes: bool) -> None:
    from .helpers import load_tiny

    assert LLMEngine(*load_tiny(family_name), EngineConfig(max_num_seqs=2, **config)).runner.mixes is mixes


def test_engine_prompt_lengths_differ(loaded: Any) -> None:
    engine = make_engine(loaded)
    lengths = [len(engine.prepare(IMAGES[i], PROMPTS[i], SamplingParams(), ignore).prompt_ids) for i in range(6)]
    assert len(set(lengths)) == 6 and min(lengths) > 16  # every prompt is chunked at max_prefill_tokens=16


def test_a_step_is_read_back_only_after_the_next_one_was_launched(loaded: Any, greedy_reference: list,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlap that keeps the GPU busy: the host waits for step k's tokens after launching step k+1 (the engine
    does it on GPUs; here it is turned on to check the bookkeeping)."""
    engine = make_engine(loaded, max_num_seqs=2)
    assert not engine.overlap_steps  # on the CPU each step is read back at once
    engine.overlap_steps = True
    events: list[tuple[str, int]] = []
    read_back = engine.runner.read_back

    def recording() -> Callable[[], list[int]]:
        step = sum(kind == "launched" for kind, _ in events)
        events.append(("launched", step))
        wait = read_back()

        def waiting() -> list[int]:
            events.append(("waited", step))
            return wait()
        return waiting

    monkeypatch.setattr(engine.runner, "read_back", recording)
    items = [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i])) for i in (0, 1, 2)]
    assert engine.generate(items) == [list(greedy_reference[i].token_ids) for i in (0, 1, 2)]
    steps = sum(kind == "launched" for kind, _ in events)
    assert steps > 10 and sorted(events) == sorted([(k, i) for i in range(steps) for k in ("launched", "waited")])
    for step in range(steps - 1):
        assert events.index(("launched", step + 1)) < events.index(("waited", step)), events


def test_a_stop_token_costs_one_dropped_step_where_steps_overlap(loaded: Any, greedy_reference: list,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    expected = list(greedy_reference[0].token_ids)
    stop = expected[3]
    assert stop not in expected[:3]
    monkeypatch.setattr(loaded.family, "stop_token_ids", lambda model, processor: {stop})
    for overlap, decodes in ((True, 4), (False, 3)):
        engine = make_engine(loaded)
        engine.overlap_steps = overlap
        collector = Collector()
        request = engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=12), collector)
        engine.submit(request)
        while engine.has_work() or not collector.finished.qsize():
            engine._drain(block=False)
            engine.step()
        assert collector.tokens(request.request_id) == expected[:3]
        assert collector.outputs[request.request_id][-1].finish_reason == "stop"
        # Decodes gave tokens 1-3 (3 is the stop) and, overlapped (launched before 3 was read back), one more that
        # was dropped; read back at once (the CPU's way), none.
        assert engine.stats.decode_tokens == decodes
        assert engine.cache.free_slots == engine.cache.num_slots and not engine.has_work()


def test_on_the_cpu_a_step_hands_out_its_own_tokens(loaded: Any, greedy_reference: list) -> None:
    """Without the overlap a request's first token leaves with the step that prefilled it, not one step later."""
    engine = make_engine(loaded)
    collector = Collector()
    request = engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=3), collector)
    engine.submit(request)
    engine._drain(block=False)
    steps = 0
    while not collector.outputs.get(request.request_id):
        assert engine.step()
        steps += 1
    assert steps == 1 and collector.tokens(request.request_id) == list(greedy_reference[0].token_ids[:1])


# -- (b) seeded sampling -----------------------------------------------------------------------------------------
def test_seeded_sampled_request_matches_generate_batch(loaded: Any) -> None:
    sampled = SamplingParams(max_tokens=14, temperature=1.3, top_p=0.9, seed=1234)
    greedy = SamplingParams(max_tokens=6)
    (expected,) = reference(loaded, [sampled], [1])
    engine = make_engine(loaded, max_num_seqs=2, max_prefill_tokens=32)
    tokens = engine.generate([(IMAGES[0], PROMPTS[0], greedy), (IMAGES[1], PROMPTS[1], sampled),
                              (IMAGES[2], PROMPTS[2], greedy)])
    assert tokens[1] == list(expected.token_ids)
    (greedy_alone,) = reference(loaded, [SamplingParams(max_tokens=14)], [1])
    assert tokens[1] != list(greedy_alone.token_ids)  # it really sampled
    other_seed = engine.generate([(IMAGES[1], PROMPTS[1], SamplingParams(max_tokens=14, temperature=1.3,
                                                                         top_p=0.9, seed=99))])
    assert other_seed[0] != tokens[1]


def test_tiny_temperature_is_greedy_in_the_engine(loaded: Any, greedy_reference: list) -> None:
    engine = make_engine(loaded)
    (tokens,) = engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=12, temperature=1e-40))])
    assert tokens == list(greedy_reference[0].token_ids)


# -- (c) ignore_eos ----------------------------------------------------------------------------------------------
def run_to_completion(engine: LLMEngine, engines: list[LLMEngine],
                      requests: list[tuple[int, SamplingParams, bool | None]]) -> tuple[Collector, list[str]]:
    collector = Collector()
    start(engine, engines)
    ids = []
    for index, params, ignore_eos in requests:
        request = engine.prepare(IMAGES[index], PROMPTS[index], params, collector, ignore_eos=ignore_eos)
        ids.append(request.request_id)
        engine.submit(request)
    collector.wait_finished(len(requests))
    return collector, ids


def test_a_choices_first_token_carries_when_it_was_scheduled_and_read_back(loaded: Any, threaded: list) -> None:
    before = time.perf_counter()
    collector, ids = run_to_completion(make_engine(loaded, max_num_seqs=2), threaded, [
        (0, SamplingParams(max_tokens=5, ignore_eos=True), None),
        (1, SamplingParams(max_tokens=4, ignore_eos=True, n=2, temperature=1.0, seed=3), None),
        (2, SamplingParams(max_tokens=3, ignore_eos=True), None),  # waits for a slot
    ])
    after = time.perf_counter()
    for request_id in ids:
        outputs = [out for out in collector.outputs[request_id] if out.new_token_ids]
        for index in {out.index for out in outputs}:
            stamped = [out.first_token_times for out in outputs if out.index == index]
            admitted, produced = stamped[0] or (0.0, 0.0)
            assert before < admitted < produced < after  # its first token's output only
            assert stamped[1:] == [None] * (len(stamped) - 1)


def test_ignore_eos_runs_to_max_tokens(loaded: Any, greedy_reference: list, threaded: list,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first = greedy_reference[0].token_ids[0]
    monkeypatch.setattr(loaded.family, "stop_token_ids", lambda model, processor: {first, 10**6})
    engine = make_engine(loaded)
    assert first in engine.stop_token_ids
    collector, (normal, ignoring, by_keyword) = run_to_completion(engine, threaded, [
        (0, SamplingParams(max_tokens=12), None),
        (0, SamplingParams(max_tokens=12, ignore_eos=True), None),
        (0, SamplingParams(max_tokens=12), True),  # prepare(ignore_eos=True) overrides the params
    ])
    final = {rid: collector.outputs[rid][-1] for rid in (normal, ignoring, by_keyword)}
    assert final[normal].finish_reason == "stop" and collector.tokens(normal) == []
    assert final[normal].generated_tokens == 0
    for rid in (ignoring, by_keyword):
        assert final[rid].finish_reason == "length" and final[rid].error is None
        assert collector.tokens(rid) == list(greedy_reference[0].token_ids)  # the "EOS" token is kept
        assert final[rid].generated_tokens == 12
    assert engine.cache.free_slots == engine.cache.num_slots


def test_ignore_eos_false_keyword_restores_stopping(loaded: Any, greedy_reference: list,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = greedy_reference[0].token_ids[0]
    monkeypatch.setattr(loaded.family, "stop_token_ids", lambda model, processor: {first})
    engine = make_engine(loaded)
    request = engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True), ignore,
                             ignore_eos=False)
    assert request.stop_token_ids == frozenset({first})
    assert engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=5))]) == [[]]
    assert engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=5))], ignore_eos=True) == [
        list(greedy_reference[0].token_ids[:5])]


# -- (d) threaded mode ------------------------------------------------------------------------------------------
def test_threaded_mode_gives_identical_results(loaded: Any, greedy_reference: list) -> None:
    engine = make_engine(loaded, max_num_seqs=3, max_prefill_tokens=24).start()
    try:
        assert engine._thread is not None and engine._thread.is_alive()
        items = [(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=m)) for i, m in enumerate(MAX_TOKENS)]
        assert engine.generate(items) == [list(r.token_ids) for r in greedy_reference]
        # A second call to the same running engine, from another thread too.
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(engine.generate(items[:2])))
        worker.start()
        worker.join(WAIT)
        assert results == [[list(r.token_ids) for r in greedy_reference[:2]]]
    finally:
        engine.shutdown()
    assert engine._thread is None
    assert engine.cache.free_slots == engine.cache.num_slots


def test_shutdown_aborts_what_is_still_running(loaded: Any) -> None:
    engine = make_engine(loaded, max_num_seqs=1)
    collector = Collector()
    entered, gate = threading.Event(), threading.Event()

    def hold(out: RequestOutput) -> None:  # hold the engine thread inside its first callback
        if not entered.is_set():
            entered.set()
            gate.wait(WAIT)

    collector.hooks.append(hold)
    engine.start()
    for index in (0, 1):  # the second waits for the only sequence slot
        engine.submit(engine.prepare(IMAGES[index], PROMPTS[index], SamplingParams(max_tokens=200), collector))
    assert entered.wait(WAIT)
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()  # queues the shutdown while the engine is mid-step, then waits for the thread
    while engine._inbox.empty():
        threading.Event().wait(0.001)
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive() and engine._thread is None
    finals = collector.wait_finished(2)
    assert [out.finish_reason for out in finals.values()] == ["abort", "abort"]
    assert sorted(out.generated_tokens for out in finals.values()) == [0, 1]
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()


# -- (e) abort ---------------------------------------------------------------------------------------------------
def test_abort_ends_a_running_request_and_frees_its_slot(loaded: Any, threaded: list) -> None:
    engine = start(make_engine(loaded, max_num_seqs=2), threaded)
    collector = Collector()
    request = engine.prepare(IMAGES[1], PROMPTS[1], SamplingParams(max_tokens=150), collector)
    # Abort from inside the first output: the engine thread handles it before its next step (deterministic).
    collector.hooks.append(lambda out: engine.abort(request.request_id) if out.new_token_ids else None)
    engine.submit(request)
    final = collector.wait_finished(1)[request.request_id]
    assert final.finished and final.finish_reason == "abort" and final.new_token_ids == ()
    assert final.error is None
    assert collector.tokens(request.request_id) and len(collector.tokens(request.request_id)) < 150
    assert final.generated_tokens == len(collector.tokens(request.request_id))
    assert [o.finished for o in collector.outputs[request.request_id]].count(True) == 1  # exactly one final
    # The slot is back and the engine serves the next request.
    assert engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=3))])[0]
    assert engine.cache.free_slots == engine.cache.num_slots
    assert engine.scheduler.find(request.request_id) == []


def test_abort_a_waiting_request_and_an_unknown_id(loaded: Any, threaded: list,
                                                   greedy_reference: list) -> None:
    engine = make_engine(loaded, max_num_seqs=1)
    collector = Collector()
    first = engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=12), collector)
    queued = engine.prepare(IMAGES[1], PROMPTS[1], SamplingParams(max_tokens=12), collector)
    # Queue both and both aborts before the engine thread starts: the second is still waiting when aborted.
    engine.submit(first)
    engine.submit(queued)
    engine.abort(queued.request_id)
    engine.abort("no-such-request")
    start(engine, threaded)
    finals = collector.wait_finished(2)
    assert finals[queued.request_id].finish_reason == "abort" and collector.tokens(queued.request_id) == []
    assert finals[first.request_id].finish_reason == "length"
    assert collector.tokens(first.request_id) == list(greedy_reference[0].token_ids)
    assert engine.cache.free_slots == engine.cache.num_slots


# -- (f) context limit -------------------------------------------------------------------------------------------
def test_prompt_plus_max_tokens_over_max_model_len_is_refused(loaded: Any) -> None:
    engine = make_engine(loaded, max_model_len=64)
    prompt_len = len(engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=1), ignore).prompt_ids)
    fits = SamplingParams(max_tokens=64 - prompt_len)
    assert engine.prepare(IMAGES[0], PROMPTS[0], fits, ignore).params is fits  # exactly the context: accepted
    with pytest.raises(InvalidInputError) as info:
        engine.prepare(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=65 - prompt_len), ignore)
    message = str(info.value)
    assert f"prompt of {prompt_len} tokens" in message and "context of 64 tokens" in message
    # A request right at the limit runs to it.
    (tokens,) = engine.generate([(IMAGES[0], PROMPTS[0], fits)])
    assert len(tokens) == 64 - prompt_len


def test_max_model_len_is_capped_by_the_model_context(loaded: Any) -> None:
    engine = make_engine(loaded, max_model_len=100_000, max_num_seqs=1)
    assert engine.max_model_len == loaded.model.config.text_config.max_position_embeddings == 1024
    assert engine.cache.max_len == 1024


# -- (i) a failing step ------------------------------------------------------------------------------------------
def test_failed_step_fails_only_its_sequences(loaded: Any, greedy_reference: list, threaded: list,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(loaded, max_num_seqs=2)
    original = engine.runner.decode
    calls: list[list[str]] = []

    def flaky(seqs: list[Any], **kwargs: Any) -> Any:
        calls.append([s.request.request_id for s in seqs])
        if len(calls) == 1:
            raise RuntimeError("device-side assert triggered")
        return original(seqs, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", flaky)
    collector = Collector()
    requests = [engine.prepare(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i] + 4), collector)
                for i in (0, 1, 2)]
    for request in requests:
        engine.submit(request)
    start(engine, threaded)
    finals = collector.wait_finished(3)
    failed = calls[0]
    assert sorted(failed) == sorted(r.request_id for r in requests[:2])  # the first decode step had two rows
    for request_id in failed:
        assert finals[request_id].finish_reason == "error"
        assert isinstance(finals[request_id].error, GenerationError)
        assert "RuntimeError: device-side assert triggered" in str(finals[request_id].error)
    # The waiting request ran normally afterwards, as did a new one.
    survivor = requests[2].request_id
    (expected,) = reference(loaded, [SamplingParams(max_tokens=MAX_TOKENS[2] + 4)], [2])
    assert finals[survivor].finish_reason == "length" and finals[survivor].error is None
    assert collector.tokens(survivor) == list(expected.token_ids)
    assert engine.generate([(IMAGES[3], PROMPTS[3], SamplingParams(max_tokens=1))]) == [
        list(greedy_reference[3].token_ids)]
    assert engine.cache.free_slots == engine.cache.num_slots


def test_failed_step_in_synchronous_generate_raises_the_error(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(loaded)

    def broken(seqs: list[Any]) -> torch.Tensor:
        raise ValueError("bad chunk")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    with pytest.raises(GenerationError, match="ValueError: bad chunk"):
        engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=3))])
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()
    monkeypatch.undo()
    assert engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=3))])[0]


# -- construction -------------------------------------------------------------------------------------------------
def test_engine_on_cpu_uses_the_torch_twins_and_keeps_the_hf_model_working(loaded: Any,
                                                                            greedy_reference: list) -> None:
    engine = make_engine(loaded, max_num_seqs=3)
    assert engine.decoder.fused is False and engine.runner.use_graphs is False
    assert engine.cache.num_slots == 3  # CPU: max_num_seqs slots, no memory sizing
    # The fused q/k/v and gate/up tensors share storage with the HF weights: the HF path still gives the same.
    assert reference(loaded, [SamplingParams(max_tokens=12)], [0])[0] == greedy_reference[0]


def test_families_without_an_engine_adapter_are_refused(auto_runtime: VLMRuntime) -> None:
    auto = auto_runtime.ensure_loaded()  # any HF image-text-to-text model: the batched loop only
    assert auto.family.engine_adapter() is None
    with pytest.raises(GenerationError, match=f"does not support the {auto.family.name} family yet"):
        LLMEngine(auto.family, auto.model, auto.processor, EngineConfig(max_model_len=64))


def test_sequences_end_finished(loaded: Any) -> None:
    engine = make_engine(loaded)
    seen: list[Any] = []
    original = engine.scheduler.finish

    def finish(seq: Any, reason: str) -> None:
        original(seq, reason)
        seen.append((seq.status, seq.finish_reason, seq.slot, seq.prompt_embeds))

    engine.scheduler.finish = finish  # type: ignore[method-assign]
    engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=2))])
    assert seen == [(SequenceStatus.FINISHED, "length", -1, None)]


# -- known engine bugs (src/triton_vlm/engine/engine.py, not fixed here) ------------------------------------------
def test_generate_with_no_requests_returns_at_once(loaded: Any, threaded: list) -> None:
    engine = start(make_engine(loaded), threaded)
    assert engine.generate([], timeout=0.5) == []


def test_synchronous_generate_timeout_is_an_error(loaded: Any) -> None:
    engine = make_engine(loaded)
    try:
        result = engine.generate([(IMAGES[0], PROMPTS[0], SamplingParams(max_tokens=50))], timeout=0)
    except GenerationError:
        result = None
    assert result is None, f"returned {result} instead of raising"
    assert engine.cache.free_slots == engine.cache.num_slots and not engine.scheduler.has_work()
