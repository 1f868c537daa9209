"""Custom Prometheus metrics, served by Triton on its metrics port beside ``nv_inference_*``."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils


class BackendMetrics:
    """Per-model gauges and counters through the Python backend's metrics API.

    Only the thread running ``execute`` updates them (one owner), so no lock is needed.
    """

    def __init__(self, model_name: str) -> None:
        labels = {"model": model_name}
        # A MetricFamily must outlive its metrics, so we hold on to every family.
        self._families: list[Any] = []

        def metric(name: str, description: str, kind: Any) -> Any:
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels)

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.loaded = metric("triton_vlm_model_loaded", "1 once the model's weights are loaded, else 0", gauge)
        self.load_seconds = metric("triton_vlm_model_load_seconds", "Seconds the last weight load took", gauge)
        self.load_failures = metric("triton_vlm_model_load_failures_total", "Failed weight loads", counter)
        self.prompt_tokens = metric("triton_vlm_prompt_tokens_total", "Prompt tokens processed", counter)
        self.generated_tokens = metric("triton_vlm_generated_tokens_total", "Tokens generated", counter)
        self.request_errors = metric("triton_vlm_request_errors_total", "Requests answered with an error", counter)
        self.batch_size = metric("triton_vlm_last_batch_size", "Requests in the last executed batch", gauge)
        self.loaded.set(0)
