"""What ``triton-vlm status`` reports: the server, and per model its state, readiness, instances and weights.

Read from Triton's repository index, each model's served configuration, and the metrics port
(``triton_vlm_model_loaded``, ``triton_vlm_model_load_seconds``, request and token counters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from triton_vlm.config import string_parameters
from triton_vlm.errors import TritonVLMError
from triton_vlm.observability.scrape import Sample, fetch_metrics, parse_metrics, value_of


@dataclass
class ModelStatus:
    name: str
    version: str
    state: str
    ready: bool
    reason: str = ""
    instances: list[str] = field(default_factory=list)  # e.g. ["1x CPU"]
    max_batch_size: int | None = None
    decoupled: bool = False
    forwards_to: str | None = None
    base_model: str | None = None
    weights_loaded: bool | None = None  # None: no triton_vlm metrics for it (metrics unreachable)
    #: False: no weights here (not tiny, no local_path, not in the HF cache, the Hub unreachable or off).
    weights_available: bool | None = None
    load_seconds: float | None = None
    load_failures: int | None = None
    requests: int | None = None
    failed_requests: int | None = None
    generated_tokens: int | None = None


@dataclass
class ServerStatus:
    url: str
    protocol: str
    live: bool
    ready: bool
    metrics_url: str | None  # None: not known (see metrics_source), so not read
    server: str = ""
    version: str = ""
    metrics_error: str = ""
    #: Where metrics_url came from (a flag, or derived from the server's address), or why there is none.
    metrics_source: str = ""
    models: list[ModelStatus] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gather(client: Any, metrics_url: str | None, metrics_source: str = "") -> ServerStatus:
    """The status of the server ``client`` talks to; raises :class:`ServerUnreachableError` if it is down.
    ``metrics_url`` None: the metrics are not read (``metrics_source`` says why)."""
    metadata = client.server_metadata()  # raises when unreachable
    status = ServerStatus(url=client.url, protocol=client.protocol, live=True, ready=client.is_ready(),
                          metrics_url=metrics_url, server=str(metadata.get("name", "")),
                          version=str(metadata.get("version", "")), metrics_source=metrics_source)
    samples: list[Sample] = []
    if metrics_url is not None:
        try:
            samples = parse_metrics(fetch_metrics(metrics_url, timeout=5))
        except (TritonVLMError, ValueError) as exc:
            status.metrics_error = str(exc)
    for entry in sorted(client.list_models(), key=lambda m: m["name"]):
        name = entry["name"]
        model = ModelStatus(name=name, version=str(entry.get("version", "")), state=str(entry.get("state", "")),
                            ready=False, reason=str(entry.get("reason", "")))
        if model.state == "READY":
            model.ready = client.is_ready(name)
            _read_config(client, model)
        if samples:
            _read_metrics(samples, model)
        status.models.append(model)
    return status


def _read_config(client: Any, model: ModelStatus) -> None:
    try:
        config = client.model_config(model.name)
    except TritonVLMError:
        return
    model.max_batch_size = int(config.get("max_batch_size", 0) or 0)
    model.decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
    for group in config.get("instance_group") or []:
        kind = str(group.get("kind", "KIND_AUTO")).removeprefix("KIND_")
        model.instances.append(f"{int(group.get('count', 1))}x {kind}")
    parameters = string_parameters(config.get("parameters"))
    model.forwards_to = parameters.get("forward_to") or None
    model.base_model = parameters.get("base_model") or None


def _read_metrics(samples: list[Sample], model: ModelStatus) -> None:
    def number(name: str, **labels: str) -> float | None:
        return value_of(samples, name, **labels)

    loaded = number("triton_vlm_model_loaded", model=model.name)
    if loaded is not None:
        model.weights_loaded = loaded >= 1
        available = number("triton_vlm_model_weights_available", model=model.name)
        model.weights_available = None if available is None else available >= 1
        seconds = number("triton_vlm_model_load_seconds", model=model.name)
        model.load_seconds = seconds if model.weights_loaded else None
        failures = number("triton_vlm_model_load_failures_total", model=model.name)
        model.load_failures = None if failures is None else int(failures)
        generated = number("triton_vlm_generated_tokens_total", model=model.name)
        model.generated_tokens = None if generated is None else int(generated)
    success = number("nv_inference_request_success", model=model.name)
    model.requests = None if success is None else int(success)
    # Triton 2.51's Python backend counts a request answered with an error as a success (server issue #7713):
    # the failures are our backend's error count plus what Triton refused before the model saw it.
    errors = number("triton_vlm_request_errors_total", model=model.name)
    refused = [s.value for s in samples if s.name == "nv_inference_request_failure" and s.label("model") == model.name]
    model.failed_requests = None if errors is None and not refused else int((errors or 0) + sum(refused))


def format_status(status: ServerStatus) -> str:
    """A human-readable report: a server line, then a table of models."""
    state = ", ".join(["live" if status.live else "not live", "ready" if status.ready else "NOT READY"])
    if status.metrics_url is None:
        metrics = f"metrics  {status.metrics_source}"
    else:
        metrics = f"metrics  {status.metrics_url}" + (f"  (unreachable: {status.metrics_error})"
                                                     if status.metrics_error else "")
        metrics += f"  [{status.metrics_source}]" if status.metrics_source else ""
    lines = [f"server   {status.url} ({status.protocol})  {status.server} {status.version}  {state}", metrics]
    header = ("MODEL", "STATE", "READY", "INSTANCES", "BATCH", "WEIGHTS", "REQUESTS", "TOKENS")
    rows = [header]
    for m in status.models:
        if m.weights_loaded is None:
            weights = "-" if m.forwards_to is None else f"via {m.forwards_to}"
        elif m.weights_loaded:
            weights = f"loaded ({m.load_seconds:.1f} s)" if m.load_seconds is not None else "loaded"
        elif m.weights_available is False:
            weights = "weights unavailable" + (f" ({m.load_failures} failed loads)" if m.load_failures else "")
        else:
            weights = "not loaded" + (f", {m.load_failures} failed" if m.load_failures else " (loads on first request)")
        batch = "-" if m.max_batch_size is None else ("stream" if m.decoupled else str(m.max_batch_size or "off"))
        requests = "-" if m.requests is None else str(m.requests) + (f" ({m.failed_requests} failed)"
                                                                     if m.failed_requests else "")
        rows.append((m.name, m.state + (f": {m.reason}" if m.reason else ""), "yes" if m.ready else "no",
                     ", ".join(m.instances) or "-", batch, weights, requests,
                     "-" if m.generated_tokens is None else str(m.generated_tokens)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if any(m.weights_available is False and not m.weights_loaded for m in status.models):
        lines.append("weights unavailable: every request fails until the weights are there: the Hugging Face cache "
                     "(HF_HOME), <MODEL>_LOCAL_PATH, or Hub access; see the server's start note")
    return "\n".join(lines)
