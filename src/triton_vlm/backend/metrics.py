"""Custom Prometheus metrics, served by Triton on its metrics port (``:8002/metrics``) beside ``nv_inference_*``.

Every metric carries a ``model`` label. Latencies are histograms (Triton 2.51's Python backend has
``MetricFamily.HISTOGRAM``): Prometheus gets ``_bucket``, ``_sum`` and ``_count`` series, so dashboards take
averages as ``rate(_sum) / rate(_count)`` and percentiles with ``histogram_quantile``. On a Triton whose
Python backend lacks histograms, the same ``_sum`` and ``_count`` series are exported as two counters
(no ``_bucket``), so averages keep working there. See docs/observability.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import triton_python_backend_utils as pb_utils

from triton_vlm.observability.phases import PHASE_METRIC

log = logging.getLogger("triton_vlm")

#: Upper bounds (seconds) for time to first token: a tiny model on CPU answers in ms, a 7B prefill in 10s of ms,
#: a first request that loads weights in seconds to minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds (seconds) for one request's mean time per output token after the first.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
#: Upper bounds for requests per executed batch (HF path) or sequences per engine step.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Upper bounds (seconds) for one phase of a time to first token (:mod:`triton_vlm.observability.phases`): an
#: image decode or a prefix-cache lookup takes under a millisecond, a 7B prefill tens of milliseconds.
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

#: Every custom metric name (histograms by their base name), for docs and tests.
METRIC_NAMES = (
    "triton_vlm_model_loaded", "triton_vlm_model_weights_available", "triton_vlm_model_load_seconds", "triton_vlm_model_load_failures_total",
    "triton_vlm_prompt_tokens_total", "triton_vlm_generated_tokens_total", "triton_vlm_request_errors_total",
    "triton_vlm_last_batch_size", "triton_vlm_batch_size", "triton_vlm_time_to_first_token_seconds",
    "triton_vlm_time_per_output_token_seconds", PHASE_METRIC,
)
#: The engine's counters (``<model>_stream`` models only).
ENGINE_METRIC_NAMES = ("triton_vlm_engine_steps_total", "triton_vlm_engine_tokens_total",
                       "triton_vlm_engine_seconds_total", "triton_vlm_prefix_cache_requests_total",
                       "triton_vlm_prefix_cache_tokens_total")


#: The engine's phases, as in :class:`triton_vlm.engine.engine.EngineStats`.
ENGINE_PHASES = ("schedule", "vision", "prefill", "decode", "mixed", "wait", "update")  # EngineStats.seconds


class EngineMetrics:
    """Counters of a ``<model>_stream`` model's engine (:class:`~triton_vlm.engine.engine.EngineStats`), brought
    up to date by :meth:`update` from the response thread (the engine thread never pays for an IPC call)."""

    def __init__(self, model_name: str) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        self._families = [
            pb_utils.MetricFamily(name="triton_vlm_engine_steps_total", description="Engine steps run", kind=counter),
            pb_utils.MetricFamily(name="triton_vlm_engine_tokens_total",
                                  description="Tokens the engine ran, by phase (prefill: prompt; decode: generated)",
                                  kind=counter),
            pb_utils.MetricFamily(name="triton_vlm_engine_seconds_total",
                                  description="Seconds the engine thread spent, by phase", kind=counter),
            pb_utils.MetricFamily(name="triton_vlm_prefix_cache_requests_total",
                                  description="Requests whose prompt the prefix cache looked up, by result (hit: "
                                              "it held a prefix; miss: none)", kind=counter),
            pb_utils.MetricFamily(name="triton_vlm_prefix_cache_tokens_total",
                                  description="Prompt positions the prefix cache held (not prefilled again)",
                                  kind=counter),
        ]
        steps, tokens, seconds, lookups, cached = self._families
        model = {"model": model_name}
        self.steps = steps.Metric(labels=model)
        self.tokens = {kind: tokens.Metric(labels={**model, "phase": kind}) for kind in ("prefill", "decode")}
        self.seconds = {phase: seconds.Metric(labels={**model, "phase": phase}) for phase in ENGINE_PHASES}
        self.prefix_cache = {result: lookups.Metric(labels={**model, "result": result}) for result in ("hit", "miss")}
        self.cached_tokens = cached.Metric(labels=model)
        self._last: dict[str, float] = {}

    def update(self, stats: Any) -> None:
        """Add what ``stats`` gained since the last update."""
        counters = {"steps": (stats.steps, self.steps), "prefill": (stats.prefill_tokens, self.tokens["prefill"]),
                    "decode": (stats.decode_tokens, self.tokens["decode"]),
                    "hit": (stats.prefix_hits, self.prefix_cache["hit"]),
                    "miss": (stats.prefix_misses, self.prefix_cache["miss"]),
                    "cached": (stats.prefix_cached_tokens, self.cached_tokens),
                    **{f"seconds.{phase}": (stats.seconds.get(phase, 0.0), self.seconds[phase])
                       for phase in ENGINE_PHASES}}
        for key, (value, metric) in counters.items():
            delta = value - self._last.get(key, 0.0)
            if delta > 0:
                metric.increment(delta)
            self._last[key] = value


class _SumCount:
    """A histogram's ``_sum`` and ``_count`` as two counters: for Python backends without histograms."""

    def __init__(self, total: Any, count: Any) -> None:
        self._total, self._count = total, count

    def observe(self, value: float) -> None:
        self._total.increment(value)
        self._count.increment(1)


class BackendMetrics:
    """Per-model gauges, counters and histograms through the Python backend's metrics API.

    Updates are single calls into the backend (thread-safe there); a model updates them from its execute
    thread and, for the streaming model, its response thread.
    """

    def __init__(self, model_name: str) -> None:
        labels = {"model": model_name}
        # A MetricFamily must outlive its metrics, so we hold on to every family.
        self._families: list[Any] = []

        def metric(name: str, description: str, kind: Any) -> Any:
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels)

        def histogram(name: str, description: str, buckets: tuple[float, ...]) -> Callable[..., Any]:
            """The family's metric for these labels (the model's and ``extra``), made on first use."""
            kind = getattr(pb_utils.MetricFamily, "HISTOGRAM", None)
            if kind is None:
                total, count = (pb_utils.MetricFamily(name=f"{name}_{part}", description=f"{description} ({part})",
                                                      kind=counter) for part in ("sum", "count"))
                self._families += [total, count]
                return functools.cache(lambda **extra: _SumCount(total.Metric(labels={**labels, **extra}),
                                                                 count.Metric(labels={**labels, **extra})))
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(family)
            return functools.cache(lambda **extra: family.Metric(labels={**labels, **extra},
                                                                 buckets=[float(b) for b in buckets]))

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.loaded = metric("triton_vlm_model_loaded", "1 once the model's weights are loaded, else 0", gauge)
        self.weights_available = metric(
            "triton_vlm_model_weights_available",
            "1 where the model's weights can be had here (tiny, local_path, the HF cache, or the Hub answers), "
            "0 where every request fails for want of them", gauge)
        self.load_seconds = metric("triton_vlm_model_load_seconds", "Seconds the last weight load took", gauge)
        self.load_failures = metric("triton_vlm_model_load_failures_total", "Failed weight loads", counter)
        self.prompt_tokens = metric("triton_vlm_prompt_tokens_total", "Prompt tokens processed", counter)
        self.generated_tokens = metric("triton_vlm_generated_tokens_total", "Tokens generated", counter)
        self.request_errors = metric("triton_vlm_request_errors_total", "Requests answered with an error", counter)
        self.batch_size = metric("triton_vlm_last_batch_size",
                                 "Requests in the last executed batch (engine: sequences running)", gauge)
        self.batch_sizes = histogram("triton_vlm_batch_size",
                                     "Requests per executed batch (engine: sequences per step, sampled)",
                                     BATCH_BUCKETS)()
        self.time_to_first_token = histogram(
            "triton_vlm_time_to_first_token_seconds",
            "Seconds from the backend receiving a request to its first generated token", TTFT_BUCKETS)()
        self.time_per_output_token = histogram(
            "triton_vlm_time_per_output_token_seconds",
            "Per request: mean seconds between output tokens after the first", TPOT_BUCKETS)()
        # Engine models only, one series per phase as it is first observed.
        self._phase = histogram(PHASE_METRIC, "Seconds of each phase of an engine request's time to first token "
                                "(wait, parse, prepare, queue, prefill, respond)", PHASE_BUCKETS)
        self.loaded.set(0)

    def note_weights(self, runtime: Any) -> None:
        """Set ``triton_vlm_model_weights_available`` from where ``runtime``'s weights would come from (disk
        checks, and a Hub probe where they are in no cache); Triton calls the model READY either way."""
        from triton_vlm.availability import weights_availability

        found = weights_availability(runtime.settings, runtime.family.default_hf_model_id)
        self.weights_available.set(1 if found.available else 0)
        if not found.available:
            log.warning("model %s: no weights here (%s); every request fails until they are provided (the "
                        "launcher's start note says how)", runtime.settings.model_name, found.detail)

    def observe_request(self, received: float, first_token: float | None, finished: float,
                        generated_tokens: int, prompt_tokens: int, phases: Mapping[str, float] | None = None) -> None:
        """Token counts and latencies of one answered request; times are ``time.perf_counter()`` stamps, and
        ``phases`` the seconds of its time to first token by phase (engine models).

        Without a first-token stamp (answers that are not token streams, e.g. moondream2's detect) the answer's
        end counts as its first token.
        """
        for phase, seconds in (phases or {}).items():
            self._phase(phase=phase).observe(seconds)
        self.prompt_tokens.increment(prompt_tokens)
        self.generated_tokens.increment(generated_tokens)
        first = finished if first_token is None else first_token
        self.time_to_first_token.observe(max(first - received, 0.0))
        if generated_tokens > 1 and first_token is not None:
            self.time_per_output_token.observe(max(finished - first_token, 0.0) / (generated_tokens - 1))
