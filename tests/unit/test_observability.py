"""triton_vlm.observability: the metrics text parser, the PromQL evaluator, the Grafana dashboard and Prometheus
config in deploy/, the dashboard preview, and the status report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import ROOT

from triton_vlm.cli.addresses import metrics_address
from triton_vlm.observability import dashboard as dash
from triton_vlm.observability.promql import Evaluator, PromQLError, metric_names
from triton_vlm.observability.scrape import Recording, Sample, metric_types, parse_metrics, record, value_of
from triton_vlm.observability.status import ModelStatus, ServerStatus, format_status, gather

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "triton-vlm.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

#: What the server exports (checked against a live scrape in tests/integration/test_observability.py).
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count", "nv_cpu_utilization", "nv_cpu_memory_used_bytes",
    "nv_cpu_memory_total_bytes", "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
}


def _custom_metrics() -> set[str]:
    source = (ROOT / "src" / "triton_vlm" / "backend" / "metrics.py").read_text()
    names = set()
    for name in ("triton_vlm_time_to_first_token_seconds", "triton_vlm_time_per_output_token_seconds",
                 "triton_vlm_batch_size"):
        assert f'"{name}"' in source
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    for line in source.splitlines():
        for marker in ('metric("triton_vlm_', 'name="triton_vlm_'):
            if marker in line:
                names.add("triton_vlm_" + line.split(marker, 1)[1].split('"', 1)[0])
    assert {"triton_vlm_engine_seconds_total", "triton_vlm_model_loaded"} <= names
    return names


TEXT = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="llava",version="1"} 12
nv_inference_request_success{model="kosmos2",version="1"} 3
# TYPE triton_vlm_time_to_first_token_seconds histogram
triton_vlm_time_to_first_token_seconds_bucket{model="llava",le="0.1"} 2
triton_vlm_time_to_first_token_seconds_bucket{model="llava",le="+Inf"} 4
triton_vlm_time_to_first_token_seconds_sum{model="llava"} 1.5e-1
weird{a="x\\"y",b="line\\nbreak"} -Inf
nv_cpu_utilization 0.5
"""


# -- scrape -----------------------------------------------------------------------------------------------------
def test_parse_metrics() -> None:
    samples = parse_metrics(TEXT)
    assert samples[0] == Sample("nv_inference_request_success", (("model", "llava"), ("version", "1")), 12.0)
    assert value_of(samples, "nv_inference_request_success", model="kosmos2") == 3.0
    assert value_of(samples, "triton_vlm_time_to_first_token_seconds_bucket", le="+Inf") == 4.0
    assert value_of(samples, "triton_vlm_time_to_first_token_seconds_sum") == 0.15
    weird = value_of(samples, "weird")
    assert weird == -math.inf
    assert [s for s in samples if s.name == "weird"][0].label("a") == 'x"y'
    assert value_of(samples, "nv_cpu_utilization") == 0.5 and value_of(samples, "missing") is None
    assert metric_types(TEXT) == {"nv_inference_request_success": "counter",
                                  "triton_vlm_time_to_first_token_seconds": "histogram"}
    with pytest.raises(ValueError, match="not a Prometheus sample line"):
        parse_metrics("{broken 1")


def test_record_scrapes_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.observability import scrape

    served = iter(range(100))
    monkeypatch.setattr(scrape, "fetch_metrics", lambda url, timeout=10.0: f"c_total {next(served)}\n")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    recording = record("http://x/metrics", 3.0, 1.0, clock=lambda: now[0], sleep=sleep)
    assert recording.times == [0.0, 1.0, 2.0, 3.0]
    assert [s[0].value for s in recording.scrapes] == [0, 1, 2, 3]
    again = Recording.from_json(json.loads(json.dumps(recording.to_json())))
    assert again.times == recording.times and again.scrapes == recording.scrapes


def test_fetch_metrics_from_a_closed_port() -> None:
    from tests.unit.helpers import free_port

    from triton_vlm.errors import ServerUnreachableError
    from triton_vlm.observability.scrape import fetch_metrics

    with pytest.raises(ServerUnreachableError, match="cannot read metrics"):
        fetch_metrics(f"127.0.0.1:{free_port()}/metrics", timeout=2)


# -- promql -----------------------------------------------------------------------------------------------------
def _recording(series: dict[str, list[float]], step: float = 1.0) -> Recording:
    """``{'name{labels}': [values per scrape]}`` -> a recording with one scrape per ``step`` seconds."""
    recording = Recording()
    length = max(len(v) for v in series.values())
    for i in range(length):
        text = "\n".join(f"{key} {values[i]}" for key, values in series.items() if i < len(values)
                         and not math.isnan(values[i]))
        recording.add(i * step, parse_metrics(text))
    return recording


def test_rate_sum_and_division() -> None:
    rec = _recording({
        'req_total{model="a",version="1"}': [0, 2, 4, 6, 8, 10],
        'req_total{model="b",version="1"}': [0, 0, 1, 1, 2, 2],
        'dur_us{model="a",version="1"}': [0, 2e6, 4e6, 6e6, 8e6, 10e6],
        'dur_us{model="b",version="1"}': [0, 0, 3e6, 3e6, 6e6, 6e6],
    })
    ev = Evaluator(rec)
    rate = ev.instant('sum by (model) (rate(req_total{model=~".*"}[4s]))')
    # the window (1 s, 5 s] holds the last 4 scrapes: a goes 4 -> 10, b 1 -> 2, in 3 s
    assert rate == pytest.approx({(("model", "a"),): 2.0, (("model", "b"),): 1 / 3})
    latency = ev.instant("sum by (model) (rate(dur_us[4s])) / sum by (model) (rate(req_total[4s])) / 1000000")
    assert latency == pytest.approx({(("model", "a"),): 1.0, (("model", "b"),): 3.0})
    assert ev.instant('rate(req_total{model="b"}[4s])') == pytest.approx({(("model", "b"), ("version", "1")): 1 / 3})
    assert ev.instant('increase(req_total{model!="b"}[4s])') == {(("model", "a"), ("version", "1")): 8.0}
    assert ev.instant('irate(req_total{model="a"}[4s])') == {(("model", "a"), ("version", "1")): 2.0}
    # range: NaN until a window holds two samples
    values = ev.range_query('rate(req_total{model="a"}[2s])')[(("model", "a"), ("version", "1"))]
    assert math.isnan(values[0]) and values[1:] == [2.0] * 5
    assert ev.instant("sum(req_total) * 2 + 1") == {(): 25.0}
    assert ev.instant("-max without (version) (req_total)") == {(("model", "a"),): -10.0, (("model", "b"),): -2.0}
    assert ev.instant("count(req_total)") == {(): 2.0}
    assert ev.instant("avg(req_total)") == {(): 6.0}
    assert ev.instant("req_total / on(model) dur_us")[(("model", "a"),)] == pytest.approx(1e-6)
    assert ev.instant("clamp_min(req_total, 5)")[(("model", "b"), ("version", "1"))] == 5


def test_counter_resets_and_division_by_zero() -> None:
    rec = _recording({'c_total{m="x"}': [5, 10, 2, 4], 'zero{m="x"}': [0, 0, 0, 0]})
    ev = Evaluator(rec)
    assert ev.instant('increase(c_total[10s])')[(("m", "x"),)] == pytest.approx((5 + 2 + 2) / 3 * 10)
    assert math.isnan(ev.instant("zero / zero")[(("m", "x"),)])
    assert ev.instant("c_total / zero")[(("m", "x"),)] == math.inf


def test_histogram_quantile_matches_prometheus() -> None:
    # Buckets 0.1: 10, 0.5: 30, 1: 40, +Inf: 40 -> p50 rank 20 is in (0.1, 0.5]: 0.1 + 0.4 * 10/20 = 0.3
    buckets = {"0.1": 10, "0.5": 30, "1": 40, "+Inf": 40}
    rec = _recording({f'h_bucket{{model="a",le="{le}"}}': [0, n] for le, n in buckets.items()})
    ev = Evaluator(rec)
    assert ev.instant("histogram_quantile(0.5, sum by (model, le) (rate(h_bucket[5s])))") == pytest.approx(
        {(("model", "a"),): 0.3})
    assert ev.instant("histogram_quantile(0.95, rate(h_bucket[5s]))")[(("model", "a"),)] == pytest.approx(
        0.5 + 0.5 * (38 - 30) / 10)
    assert ev.instant("histogram_quantile(0.1, rate(h_bucket[5s]))")[(("model", "a"),)] == pytest.approx(0.04)
    idle = _recording({f'h_bucket{{le="{le}"}}': [0, 0] for le in buckets})
    assert math.isnan(Evaluator(idle).instant("histogram_quantile(0.5, rate(h_bucket[5s]))")[()])


def test_unsupported_queries_say_so() -> None:
    ev = Evaluator(_recording({"a": [1, 2]}))
    for query, message in (("topk(1, a)", "unsupported aggregation"), ("abs(a)", "unsupported function"),
                           ("a and a", "unsupported operator"), ("rate(a)", "cannot parse"),
                           ("sum(", "cannot parse"), ("1 + 1", "expected an instant vector")):
        with pytest.raises(PromQLError, match=message):
            ev.instant(query)


def test_metric_names() -> None:
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[1m]))) / on() b + -c") == {
        "a_bucket", "b", "c"}


# -- the dashboard -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_grafana_dashboard(board: dict[str, Any]) -> None:
    assert board["uid"] == "triton-vlm" and board["title"] == "triton-vlm"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["time"]["from"].startswith("now-") and board["refresh"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    assert model["query"]["query"] == "label_values(triton_vlm_model_loaded, model)"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    kinds = {p["type"] for p in board["panels"]}
    assert kinds <= {"timeseries", "stat"}


def test_dashboard_panels_tile_the_grid(board: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_dashboard_queries_parse_and_use_exported_metrics(board: dict[str, Any]) -> None:
    known = TRITON_METRICS | _custom_metrics()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            expr = dash.substitute(target["expr"], dash.preview_variables())
            names = metric_names(expr)  # parses, or raises
            assert names and names <= known, f"{panel['title']}: unknown {names - known}"
            assert target["legendFormat"]
            if "triton_vlm_" in expr or "nv_inference_" in expr:
                assert 'model=~"$model"' in target["expr"], f"{panel['title']} ignores the model variable"
            if "rate(" in expr:
                assert "[$__rate_interval]" in target["expr"]
    used = dash.dashboard_metric_names(board)
    # Every custom metric family has a panel.
    for family in ("triton_vlm_model_loaded", "triton_vlm_model_load_seconds", "triton_vlm_model_load_failures_total",
                   "triton_vlm_generated_tokens_total", "triton_vlm_prompt_tokens_total",
                   "triton_vlm_request_errors_total", "triton_vlm_time_to_first_token_seconds_bucket",
                   "triton_vlm_time_per_output_token_seconds_sum", "triton_vlm_batch_size_count",
                   "nv_inference_request_success", "nv_inference_queue_duration_us", "nv_gpu_utilization",
                   "triton_vlm_engine_seconds_total", "triton_vlm_engine_tokens_total", "triton_vlm_engine_steps_total"):
        assert family in used


def test_panels_helper_expands_rows() -> None:
    board = {"panels": [{"type": "row", "id": 9, "gridPos": {}, "panels": [
        {"id": 1, "type": "stat", "title": "x", "gridPos": {"x": 0, "y": 0, "w": 1, "h": 1},
         "targets": [{"expr": "up", "legendFormat": "{{job}}"}, {"expr": ""}]}]}]}
    (panel,) = dash.panels(board)
    assert panel.targets == (dash.Target("up", "{{job}}"),) and panel.unit == "short"
    assert dash.legend("{{model}} p95", (("model", "llava"),)) == "llava p95"
    assert dash.legend("", (("a", "1"),)) == "a=1" and dash.legend("", ()) == "value"
    assert dash.substitute("x[$__rate_interval] ${model} $model", {"model": "m", "__rate_interval": "5s"}) == \
        "x[5s] m m"


def test_preview_renders_every_panel_from_a_recording(board: dict[str, Any], tmp_path: Path) -> None:
    """A synthetic recording in the server's own format: every panel but the GPU ones has data."""
    recording = Recording()
    les = ["0.01", "0.1", "1", "+Inf"]
    for i in range(30):
        lines = ["nv_cpu_utilization 0.5", f"nv_cpu_memory_used_bytes {2e9 + i * 1e7}"]
        for model in ("llava", "kosmos2"):
            lines += [f'triton_vlm_model_loaded{{model="{model}"}} 1',
                      f'triton_vlm_model_load_seconds{{model="{model}"}} 1.5',
                      f'triton_vlm_model_load_failures_total{{model="{model}"}} 0',
                      f'triton_vlm_generated_tokens_total{{model="{model}"}} {i * 40}',
                      f'triton_vlm_prompt_tokens_total{{model="{model}"}} {i * 100}',
                      f'triton_vlm_request_errors_total{{model="{model}"}} {i // 10}',
                      f'nv_inference_request_success{{model="{model}",version="1"}} {i * 4}',
                      f'nv_inference_request_failure{{model="{model}",reason="BACKEND",version="1"}} 0',
                      f'nv_inference_request_duration_us{{model="{model}",version="1"}} {i * 4 * 2e5}',
                      f'nv_inference_queue_duration_us{{model="{model}",version="1"}} {i * 4 * 1e4}',
                      f'nv_inference_pending_request_count{{model="{model}",version="1"}} {i % 3}']
            for base, scale in (("triton_vlm_time_to_first_token_seconds", 0.05),
                                ("triton_vlm_time_per_output_token_seconds", 0.005),
                                ("triton_vlm_batch_size", 2.0)):
                lines += [f'{base}_bucket{{model="{model}",le="{le}"}} {i * 4 * (k + 1) // len(les)}'
                          for k, le in enumerate(les)]
                lines += [f'{base}_sum{{model="{model}"}} {i * 4 * scale}', f'{base}_count{{model="{model}"}} {i * 4}']
        lines += [f'triton_vlm_engine_steps_total{{model="llava_stream"}} {i * 50}',
                  f'triton_vlm_engine_tokens_total{{model="llava_stream",phase="decode"}} {i * 80}',
                  f'triton_vlm_engine_seconds_total{{model="llava_stream",phase="decode"}} {i * 0.5}']
        recording.add(float(i), parse_metrics("\n".join(lines)))
    data = dash.evaluate(board, recording, "5s")
    by_title = {d.panel.title: d for d in data}
    assert all(d.has_data for d in data), [d.panel.title for d in data if not d.has_data]
    ttft = dict(by_title["Time to first token"].series)
    assert ttft["llava avg"][-1] == pytest.approx(0.05)
    requests = dict(by_title["Requests / s"].series)
    assert requests["llava answered"][-1] == pytest.approx(4.0)
    errors = [v for v in requests["llava answered with an error"] if v == v]  # not NaN
    assert max(errors) > 0 and errors[-1] == 0  # one error at 10 s and 20 s, none in the last 5 s window
    assert dict(by_title["Request latency and queue time (avg)"].series)["kosmos2 request"][-1] == pytest.approx(0.2)
    assert dict(by_title["Batch size (avg)"].series)["llava"][-1] == pytest.approx(2.0)
    assert dict(by_title["Engine time by phase"].series)["llava_stream decode"][-1] == pytest.approx(0.5)
    output = dash.render(data, recording.times, tmp_path / "dash.png", subtitle="test")
    assert output.read_bytes().startswith(b"\x89PNG")
    summary = dash.summary(data, recording, output)
    assert summary["scrapes"] == 30 and len(summary["panels"]) == len(board["panels"])
    gpu = [p for p in summary["panels"] if p["title"] == "Utilization"][0]
    assert gpu["gpu_only"] and gpu["has_data"]  # the CPU line


def test_dashboard_preview_cli_from_a_saved_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from triton_vlm.cli.main import main

    recording = _recording({'triton_vlm_model_loaded{model="llava"}': [0, 1, 1],
                            'nv_inference_request_success{model="llava",version="1"}': [0, 1, 3]})
    saved = tmp_path / "rec.json"
    saved.write_text(json.dumps(recording.to_json()))
    output = tmp_path / "out" / "dash.png"
    assert main(["dashboard-preview", "--recording", str(saved), "--output", str(output), "--json",
                 "--dashboard", str(DASHBOARD)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(output) and output.is_file() and summary["scrapes"] == 3
    has = {p["title"]: p["has_data"] for p in summary["panels"]}
    assert has["Weights loaded"] and has["Requests / s"] and not has["Time to first token"]


# -- Prometheus and Grafana provisioning ---------------------------------------------------------------------------
def test_prometheus_scrapes_the_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert set(config) == {"global", "scrape_configs"}
    interval = config["global"]["scrape_interval"]
    assert interval.endswith("s") and int(interval[:-1]) <= 15
    assert int(config["global"]["scrape_timeout"][:-1]) < int(interval[:-1])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "triton-vlm" and job["metrics_path"] == "/metrics" and job["scheme"] == "http"
    (static,) = job["static_configs"]
    assert static["targets"] == ["triton:8002"]  # the compose service, metrics port (not 8000)


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert datasources["apiVersion"] == 1
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "triton-vlm.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"


# -- status ------------------------------------------------------------------------------------------------------
class FakeStatusClient:
    url, protocol = "h:8000", "http"

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "triton", "version": "2.51.0"}

    def is_ready(self, model: str | None = None) -> bool:
        return model != "kosmos2"

    def list_models(self) -> list[dict[str, str]]:
        return [{"name": "llava", "version": "1", "state": "READY"},
                {"name": "llava_stream", "version": "1", "state": "READY"},
                {"name": "kosmos2", "version": "1", "state": "READY"},
                {"name": "blip", "version": "1", "state": "UNAVAILABLE", "reason": "load failed"}]

    def model_config(self, model: str) -> dict[str, Any]:
        config: dict[str, Any] = {"max_batch_size": 8, "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
        if model == "llava_stream":
            config.update(max_batch_size=0, model_transaction_policy={"decoupled": True},
                          parameters={"base_model": {"string_value": "llava"}},
                          instance_group=[{"kind": "KIND_GPU", "count": 2}])
        return config


def test_status_gathers_index_config_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.observability import status as status_module

    metrics = ('triton_vlm_model_loaded{model="llava"} 1\ntriton_vlm_model_load_seconds{model="llava"} 2.25\n'
               'triton_vlm_model_load_failures_total{model="llava"} 0\n'
               'triton_vlm_generated_tokens_total{model="llava"} 42\n'
               'triton_vlm_model_loaded{model="kosmos2"} 0\ntriton_vlm_model_load_failures_total{model="kosmos2"} 2\n'
               'nv_inference_request_success{model="llava",version="1"} 5\n'
               'nv_inference_request_failure{model="llava",reason="BACKEND",version="1"} 1\n'
               'nv_inference_request_failure{model="llava",reason="OTHER",version="1"} 1\n')
    monkeypatch.setattr(status_module, "fetch_metrics", lambda url, timeout=5: metrics)
    status = gather(FakeStatusClient(), "http://h:8002/metrics")
    assert (status.live, status.ready, status.version) == (True, True, "2.51.0")
    models = {m.name: m for m in status.models}
    assert list(models) == ["blip", "kosmos2", "llava", "llava_stream"]
    llava = models["llava"]
    assert (llava.ready, llava.instances, llava.max_batch_size, llava.weights_loaded, llava.load_seconds) == (
        True, ["1x CPU"], 8, True, 2.25)
    assert (llava.requests, llava.failed_requests, llava.generated_tokens) == (5, 2, 42)
    stream = models["llava_stream"]
    assert stream.decoupled and stream.base_model == "llava" and stream.instances == ["2x GPU"]
    assert models["kosmos2"].weights_loaded is False and models["kosmos2"].load_failures == 2
    assert models["blip"].state == "UNAVAILABLE" and not models["blip"].ready
    text = format_status(status)
    assert text.splitlines()[0].startswith("server   h:8000 (http)  triton 2.51.0  live, ready")
    assert "MODEL" in text.splitlines()[2]
    line = next(row for row in text.splitlines() if row.startswith("llava "))
    assert "1x CPU" in line and "loaded (2.2 s)" in line and "5 (2 failed)" in line and line.endswith("42")
    assert "not loaded, 2 failed" in text and "UNAVAILABLE: load failed" in text and "stream" in text
    data = status.to_json()
    assert json.loads(json.dumps(data))["models"][2]["name"] == "llava"


def test_status_without_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.errors import ServerUnreachableError
    from triton_vlm.observability import status as status_module

    def down(url: str, timeout: float = 5) -> str:
        raise ServerUnreachableError("cannot read metrics")

    monkeypatch.setattr(status_module, "fetch_metrics", down)
    status = gather(FakeStatusClient(), "http://h:8002/metrics")
    assert status.metrics_error == "cannot read metrics"
    assert all(m.weights_loaded is None for m in status.models)
    assert "(unreachable: cannot read metrics)" in format_status(status)


def test_default_metrics_url() -> None:
    """Derived for Triton's default ports only (more in test_newcomer.py): port 8002 of a server on 9000 may be
    another server's."""
    assert metrics_address("localhost:8000", None).url == "http://localhost:8002/metrics"
    assert metrics_address("http://10.0.0.5:9000/", None).url is None


def test_status_table_for_an_empty_server() -> None:
    status = ServerStatus(url="h:1", protocol="grpc", live=True, ready=False, metrics_url="m")
    assert "NOT READY" in format_status(status)
    status.models.append(ModelStatus(name="x", version="1", state="LOADING", ready=False))
    assert format_status(status).splitlines()[-1].split() == ["x", "LOADING", "no", "-", "-", "-", "-", "-"]
