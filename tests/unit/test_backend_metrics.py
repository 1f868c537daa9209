"""triton_vlm.backend.metrics: histograms (or sum/count counters without them), TTFT and per-token latency from
the batched HF path, and the per-request debug log line."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import pytest

from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import VLMRuntime

from .helpers import image_bytes
from .test_backend import FakeMetric, fake_pb_utils, initialize, request


class FakeHistogram:
    def __init__(self, buckets: list[float]) -> None:
        self.buckets, self.observed = buckets, []

    def observe(self, value: float) -> None:
        self.observed.append(value)


class FakeHistogramFamily:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    created: dict[str, str] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind = name, kind
        FakeHistogramFamily.created[name] = kind

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Any:  # noqa: N802
        assert set(labels) <= {"model", "phase", "result"} and "model" in labels
        if self.kind == self.HISTOGRAM:
            assert buckets and buckets == sorted(buckets)
            return FakeHistogram(buckets)
        assert buckets is None
        return FakeMetric()


MODULES = ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics")


def _backend(monkeypatch: pytest.MonkeyPatch, family_class: type) -> Any:
    module = fake_pb_utils()
    module.MetricFamily = family_class  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("triton_vlm.backend.python_model")


@pytest.fixture
def hist_backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    FakeHistogramFamily.created = {}
    yield _backend(monkeypatch, FakeHistogramFamily)
    for name in MODULES:
        sys.modules.pop(name, None)


def test_histograms_where_the_backend_has_them(hist_backend: Any) -> None:
    model = initialize(hist_backend, "llava", {"tiny": "true"})
    created = FakeHistogramFamily.created
    for name in ("triton_vlm_time_to_first_token_seconds", "triton_vlm_time_per_output_token_seconds",
                 "triton_vlm_batch_size"):
        assert created[name] == "histogram"
    assert created["triton_vlm_generated_tokens_total"] == "counter"
    assert created["triton_vlm_model_loaded"] == "gauge"
    metrics_module = sys.modules["triton_vlm.backend.metrics"]
    assert set(created) == set(metrics_module.METRIC_NAMES)
    assert model.metrics.time_to_first_token.buckets[-1] >= 60


def test_sum_and_count_counters_without_histograms(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python backend without MetricFamily.HISTOGRAM still exports <name>_sum and <name>_count."""
    created: dict[str, str] = {}

    class OldFamily:
        GAUGE, COUNTER = "gauge", "counter"

        def __init__(self, name: str, description: str, kind: str) -> None:
            created[name] = kind

        def Metric(self, labels: dict[str, str]) -> FakeMetric:  # noqa: N802
            return FakeMetric()

    backend = _backend(monkeypatch, OldFamily)
    try:
        model = initialize(backend, "llava", {"tiny": "true"})
        assert created["triton_vlm_time_to_first_token_seconds_sum"] == "counter"
        assert created["triton_vlm_time_to_first_token_seconds_count"] == "counter"
        assert "triton_vlm_time_to_first_token_seconds" not in created
        model.metrics.observe_request(10.0, 10.5, 12.5, generated_tokens=5, prompt_tokens=7)
        ttft = model.metrics.time_to_first_token
        assert (ttft._total.value, ttft._count.value) == (0.5, 1)
        tpot = model.metrics.time_per_output_token
        assert (tpot._total.value, tpot._count.value) == (0.5, 1)  # 2 s over 4 gaps
        model.metrics.observe_request(1.0, 1.5, 2.0, generated_tokens=2, prompt_tokens=3, phases={"queue": 0.25})
        assert created["triton_vlm_first_token_phase_seconds_sum"] == "counter"
        queue = model.metrics._phase(phase="queue")
        assert (queue._total.value, queue._count.value) == (0.25, 1)
    finally:
        for name in MODULES:
            sys.modules.pop(name, None)


def test_observe_request_edge_cases(hist_backend: Any) -> None:
    metrics = initialize(hist_backend, "kosmos2", {"tiny": "true"}).metrics
    metrics.observe_request(1.0, None, 3.0, generated_tokens=0, prompt_tokens=4)  # no token stream (detect)
    metrics.observe_request(1.0, 1.25, 1.25, generated_tokens=1, prompt_tokens=4)  # one token: no gaps
    metrics.observe_request(2.0, 1.0, 1.0, generated_tokens=0, prompt_tokens=1)  # clock oddities clamp to 0
    assert metrics.time_to_first_token.observed == [2.0, 0.25, 0.0]
    assert metrics.time_per_output_token.observed == []
    assert metrics.prompt_tokens.value == 9 and metrics.generated_tokens.value == 1


def test_phases_of_a_first_token_go_to_one_series_each(hist_backend: Any) -> None:
    metrics = initialize(hist_backend, "llava", {"tiny": "true"}).metrics
    metrics.observe_request(1.0, 1.5, 2.0, generated_tokens=3, prompt_tokens=4, phases={"parse": 0.1, "prefill": 0.3})
    metrics.observe_request(1.0, 1.5, 2.0, generated_tokens=3, prompt_tokens=4, phases={"prefill": 0.2})
    metrics.observe_request(1.0, 1.5, 2.0, generated_tokens=3, prompt_tokens=4)  # the batched path: none
    assert metrics._phase(phase="parse").observed == [0.1]
    assert metrics._phase(phase="prefill").observed == [0.3, 0.2]  # the same series, made once
    assert metrics.time_to_first_token.observed == [0.5, 0.5, 0.5]


def test_execute_records_latency_and_batch_metrics(hist_backend: Any, llava_runtime: VLMRuntime,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    model = initialize(hist_backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()
    image = image_bytes(30, 20, seed=4)
    batch = [request(image, b"What is this?", max_tokens=4), request(image, b"Describe.", max_tokens=3),
             request(b"garbage", b"What is this?")]
    with caplog.at_level(logging.DEBUG, logger="triton_vlm"):
        responses = model.execute(batch)
    assert [r.error is None for r in responses] == [True, True, False]
    metrics = model.metrics
    assert metrics.batch_sizes.observed == [2] and metrics.batch_size.value == 2
    ttft, tpot = metrics.time_to_first_token.observed, metrics.time_per_output_token.observed
    assert len(ttft) == 2 and all(0 < t < 30 for t in ttft)
    assert len(tpot) == 2 and all(0 < t < 10 for t in tpot)
    assert metrics.generated_tokens.value == 7
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(lines) == 2
    assert lines[0].startswith("model llava: request image 30x20, prompt 13 chars, max_tokens 4, batch of 2: ")
    assert "+ 4 generated tokens, length" in lines[0]
    assert "+ 3 generated tokens, length" in lines[1]


def test_no_debug_lines_at_info(hist_backend: Any, llava_runtime: VLMRuntime,
                                caplog: pytest.LogCaptureFixture) -> None:
    model = initialize(hist_backend, "llava", {"tiny": "true"})
    model.runtime._loaded = llava_runtime.ensure_loaded()
    with caplog.at_level(logging.INFO, logger="triton_vlm"):
        model.execute([request(image_bytes(8, 8), b"hi", max_tokens=1)])
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]


def test_request_log_line_for_errors(hist_backend: Any, llava_runtime: VLMRuntime) -> None:
    from triton_vlm.errors import GenerationError

    parsed = llava_runtime.make_request(image_bytes(8, 6), "hi", max_tokens=2)
    line = hist_backend.request_log_line("llava", parsed, GenerationError("boom"), 0.0, 1)
    assert line.startswith("model llava: request image 8x6, prompt 2 chars, max_tokens 2, batch of 1: error after ")
    assert line.endswith("GenerationError: boom")


@pytest.mark.parametrize("value, level", [("debug", logging.DEBUG), ("WARNING", logging.WARNING),
                                          ("nonsense", logging.INFO), ("", logging.INFO)])
def test_log_level_from_environment(hist_backend: Any, monkeypatch: pytest.MonkeyPatch, value: str,
                                    level: int) -> None:
    root = logging.getLogger("triton_vlm")
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()
    monkeypatch.setenv("TRITON_VLM_LOG_LEVEL", value)
    try:
        hist_backend.configure_logging()
        assert root.level == level
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_generate_batch_stamps_first_token_and_finish(llava_runtime: VLMRuntime) -> None:
    image = image_bytes(16, 16, seed=1)
    requests = [llava_runtime.make_request(image, "What is this?", max_tokens=2, ignore_eos=True),
                llava_runtime.make_request(image, "What is this?", max_tokens=6, ignore_eos=True)]
    short, long = llava_runtime.generate(requests)
    assert isinstance(short, GenerationOutput) and isinstance(long, GenerationOutput)
    assert short.first_token_at == long.first_token_at  # one prefill for the batch
    assert short.first_token_at < short.finished_at < long.finished_at  # type: ignore[operator]
    alone = llava_runtime.generate(requests[:1])[0]
    assert alone == short  # stamps are not part of equality


def test_engine_metrics_add_what_the_stats_gained(hist_backend: Any) -> None:
    from triton_vlm.engine.engine import EngineStats

    metrics_module = sys.modules["triton_vlm.backend.metrics"]
    engine = metrics_module.EngineMetrics("llava_stream")
    assert set(FakeHistogramFamily.created) >= set(metrics_module.ENGINE_METRIC_NAMES)
    stats = EngineStats()
    engine.update(stats)
    assert engine.steps.value == 0
    stats.steps, stats.prefill_tokens, stats.decode_tokens = 10, 600, 40
    stats.seconds["decode"] = 0.25
    engine.update(stats)
    stats.steps, stats.decode_tokens = 15, 60
    stats.seconds["decode"] = 0.5
    stats.seconds["prefill"] = 0.125
    engine.update(stats)
    stats.prefix_hits, stats.prefix_misses, stats.prefix_cached_tokens = 2, 3, 160
    engine.update(stats)
    engine.update(stats)  # nothing new: nothing added
    assert engine.steps.value == 15
    assert engine.prefix_cache["hit"].value == 2 and engine.prefix_cache["miss"].value == 3
    assert engine.cached_tokens.value == 160
    assert engine.tokens["prefill"].value == 600 and engine.tokens["decode"].value == 60
    assert engine.seconds["decode"].value == 0.5 and engine.seconds["prefill"].value == 0.125
    assert engine.seconds["vision"].value == 0
    # Every phase the engine times has its metric (the backend keeps its own list: it imports no torch).
    assert tuple(EngineStats().seconds) == metrics_module.ENGINE_PHASES
