"""Observability against the real server: the custom metrics (histograms on both paths), the dashboard's metric
names in a live scrape, the dashboard preview, status, the asyncio client, infer_many, and the server log."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, SAMPLE_IMAGE
from tests.integration.conftest import ENGINE_MODELS, PROMPTS, WORKING_MODELS, RunningServer

from triton_client import AsyncTritonVLMClient, TritonVLMClient
from triton_vlm.cli.main import main
from triton_vlm.observability import dashboard as dash
from triton_vlm.observability.scrape import metric_types, parse_metrics, value_of

pytestmark = pytest.mark.integration

HISTOGRAMS = ("triton_vlm_time_to_first_token_seconds", "triton_vlm_time_per_output_token_seconds",
              "triton_vlm_batch_size")


def _value(text: str, name: str, model: str) -> float:
    found = value_of(parse_metrics(text), name, model=model)
    assert found is not None, f"{name}{{model={model!r}}} not exported"
    return found


def test_custom_metrics_are_histograms_for_every_model(triton: RunningServer) -> None:
    types = metric_types(triton.startup_metrics)
    for name in HISTOGRAMS:
        assert types[name] == "histogram"
    for name in ("triton_vlm_generated_tokens_total", "triton_vlm_prompt_tokens_total",
                 "triton_vlm_model_load_failures_total", "triton_vlm_request_errors_total"):
        assert types[name] == "counter"
    for name in ("triton_vlm_model_loaded", "triton_vlm_model_load_seconds", "triton_vlm_last_batch_size"):
        assert types[name] == "gauge"
    for model in (*WORKING_MODELS, *ENGINE_MODELS):
        for name in HISTOGRAMS:
            assert f'{name}_count{{model="{model}"}}' in triton.startup_metrics
    for name in ("triton_vlm_engine_steps_total", "triton_vlm_engine_tokens_total", "triton_vlm_engine_seconds_total"):
        assert types[name] == "counter"
        for model in ENGINE_MODELS:
            assert f'{name}{{model="{model}"' in triton.startup_metrics
        assert f'{name}{{model="llava"' not in triton.startup_metrics  # the HF path has no engine


def test_engine_counters_follow_the_engine(triton: RunningServer, sample_image_bytes: bytes) -> None:
    def counters() -> tuple[float, float, float]:
        samples = parse_metrics(triton.metrics())
        steps = value_of(samples, "triton_vlm_engine_steps_total", model="llava_stream")
        decode = value_of(samples, "triton_vlm_engine_tokens_total", model="llava_stream", phase="decode")
        seconds = sum(s.value for s in samples if s.name == "triton_vlm_engine_seconds_total")
        assert steps is not None and decode is not None
        return steps, decode, seconds

    before = counters()
    with TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url) as client:
        list(client.stream("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=8, ignore_eos=True))
    deadline = time.monotonic() + 5  # sampled every 0.25 s by the response thread
    while (after := counters())[1] - before[1] < 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after[0] - before[0] >= 7  # at least one step per decoded token after the first
    assert after[1] - before[1] == 7  # the first token comes from prefill
    assert after[2] > before[2]


def test_ttft_and_per_token_latency_on_the_batched_and_engine_paths(triton: RunningServer,
                                                                    sample_image_bytes: bytes) -> None:
    before = triton.metrics()
    with TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url) as client:
        for model in WORKING_MODELS:
            client.infer_result(model, sample_image_bytes, PROMPTS[model], max_tokens=6, ignore_eos=True)
        pieces = list(client.stream_pieces("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=6,
                                           ignore_eos=True))
    assert pieces[-1].generated_tokens == 6
    after = triton.metrics()
    for model in (*WORKING_MODELS, "llava_stream"):
        for name in ("triton_vlm_time_to_first_token_seconds", "triton_vlm_time_per_output_token_seconds"):
            count = _value(after, f"{name}_count", model) - _value(before, f"{name}_count", model)
            total = _value(after, f"{name}_sum", model) - _value(before, f"{name}_sum", model)
            assert count == 1, (model, name)
            assert 0 < total < 120, (model, name, total)
        tokens = (_value(after, "triton_vlm_generated_tokens_total", model)
                  - _value(before, "triton_vlm_generated_tokens_total", model))
        assert tokens == 6
    # Buckets are cumulative and end with +Inf == count.
    samples = parse_metrics(after)
    buckets = [(s.label("le"), s.value) for s in samples
               if s.name == "triton_vlm_time_to_first_token_seconds_bucket" and s.label("model") == "llava"]
    assert buckets[-1][0] == "+Inf"
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == _value(after, "triton_vlm_time_to_first_token_seconds_count", "llava")
    assert _value(after, "triton_vlm_batch_size_count", "llava") >= 1


def test_dashboard_queries_only_metrics_the_server_exports(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client:
        client.infer("llava", sample_image_bytes, "hi", max_tokens=2)
    exported = {s.name for s in parse_metrics(triton.metrics())}
    used = dash.dashboard_metric_names(dash.load_dashboard())
    missing = {name for name in used - exported if not name.startswith(dash.GPU_ONLY_PREFIXES)}
    assert not missing, f"the dashboard queries metrics this server does not export: {sorted(missing)}"
    assert {n for n in used if n.startswith(dash.GPU_ONLY_PREFIXES)} <= {"nv_gpu_utilization",
                                                                           "nv_gpu_memory_used_bytes"}


def test_dashboard_preview_from_the_live_server(triton: RunningServer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "dashboard.png"
    code = main(["dashboard-preview", "--metrics-url", triton.server.metrics_url, "--url", triton.http_url,
                 "--grpc-url", triton.grpc_url, "--models", "llava", "--rounds", "1", "--interval", "0.5",
                 "--rate-interval", "3s", "--seconds", "60", "--output", str(output), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert output.read_bytes().startswith(b"\x89PNG")
    assert summary["scrapes"] >= 6
    empty = [p["title"] for p in summary["panels"] if not p["has_data"] and not p["gpu_only"]]
    assert not empty, f"panels without data from a live server: {empty}"


def test_status_of_the_live_server(triton: RunningServer, sample_image_bytes: bytes,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with TritonVLMClient(triton.http_url) as client:
        client.infer("kosmos2", sample_image_bytes, PROMPTS["kosmos2"], max_tokens=2)
    metrics_url = triton.server.metrics_url
    assert main(["status", "--url", triton.http_url, "--metrics-url", metrics_url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ready"] and data["version"] == "2.51.0"
    models = {m["name"]: m for m in data["models"]}
    assert set(models) == {*WORKING_MODELS, *ENGINE_MODELS}
    for model in models.values():
        assert model["state"] == "READY" and model["ready"] and model["instances"] == ["1x CPU"]
        assert model["weights_loaded"] in (True, False)
    assert models["kosmos2"]["weights_loaded"] is True and models["kosmos2"]["requests"] >= 1
    assert models["llava_stream"]["decoupled"] and models["llava_stream"]["base_model"] == "llava"
    assert models["llava"]["max_batch_size"] == 8
    assert main(["status", "--url", triton.grpc_url, "--grpc", "--metrics-url", metrics_url]) == 0
    text = capsys.readouterr().out
    assert "triton 2.51.0  live, ready" in text and re.search(r"kosmos2\s+READY\s+yes\s+1x CPU\s+8\s+loaded", text)


def test_infer_json_cli_equals_the_client(triton: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    with TritonVLMClient(triton.http_url) as client:
        expected = client.infer_result("llava", SAMPLE_IMAGE, "What is this?", max_tokens=5)
    assert main(["infer", "--model", "llava", "--image", str(SAMPLE_IMAGE), "--prompt", "What is this?",
                 "--max-tokens", "5", "--url", triton.http_url, "--json", "--retries", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["text"], data["generated_tokens"], data["prompt_tokens"], data["finish_reason"]) == (
        expected.text, expected.generated_tokens, expected.prompt_tokens, expected.finish_reason)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client_equals_the_sync_client(triton: RunningServer, protocol: str,
                                             sample_image_bytes: bytes) -> None:
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with TritonVLMClient(url, protocol=protocol, grpc_url=triton.grpc_url) as client:  # type: ignore[arg-type]
        expected = {m: client.infer(m, sample_image_bytes, PROMPTS[m], max_tokens=6) for m in WORKING_MODELS}
        streamed = "".join(client.stream("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=6))

    async def run() -> None:
        async with AsyncTritonVLMClient(url, protocol=protocol, grpc_url=triton.grpc_url,  # type: ignore[arg-type]
                                        retry=2) as client:
            assert await client.is_ready() and await client.is_ready("llava")
            assert {m["name"] for m in await client.list_models()} == {*WORKING_MODELS, *ENGINE_MODELS}
            answers = await asyncio.gather(*(client.infer(m, sample_image_bytes, PROMPTS[m], max_tokens=6)
                                             for m in WORKING_MODELS))
            assert dict(zip(WORKING_MODELS, answers, strict=True)) == expected
            pieces = [p async for p in client.stream_pieces("llava", sample_image_bytes, PROMPTS["llava"],
                                                            max_tokens=6)]
            assert "".join(p.text for p in pieces) == streamed and pieces[-1].finish_reason
            async for _ in client.stream("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=64):
                break  # leaving early cancels the request
            many = await client.infer_many("llava", [(sample_image_bytes, PROMPTS["llava"])] * 3, concurrency=3,
                                           progress=False, max_tokens=6)
            assert [r.text for r in many] == [expected["llava"]] * 3  # type: ignore[union-attr]

    asyncio.run(run())


def test_infer_many_equals_single_requests_and_is_batched(triton: RunningServer) -> None:
    from tests.integration.test_server import _images, batched_burst

    images = _images(6)
    with TritonVLMClient(triton.http_url) as client:
        singles = [client.infer("kosmos2", image, PROMPTS["kosmos2"], max_tokens=24, ignore_eos=True)
                   for image in images]
        many, inferences, executions = batched_burst(triton, "kosmos2", images[0], lambda: client.infer_many(
            "kosmos2", [(image, PROMPTS["kosmos2"]) for image in images], concurrency=6, progress=False,
            max_tokens=24, ignore_eos=True), requests=6)
    assert [r.text for r in many] == singles  # type: ignore[union-attr]
    assert inferences == 7  # the burst and the long request before it
    assert executions < 7  # the long request alone, the burst batched


def test_server_log_tells_loads_and_requests(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url) as client:
        for model in WORKING_MODELS:
            client.infer(model, sample_image_bytes, PROMPTS[model], max_tokens=3)
        list(client.stream("llava", sample_image_bytes, "hi", max_tokens=3))
    log = triton.log()
    for model in (*WORKING_MODELS, "llava_stream"):
        # the first request says it triggers a (long) load, once; then one line with time and device
        assert log.count(f"model {model}: loading weights on first use (this can take a while)") == 1, model
        loads = re.findall(rf"loaded model {model} \(\w+ from .+\) on (cpu) as float32 in ([0-9.]+)s", log)
        assert len(loads) == 1 and float(loads[0][1]) > 0, model
        assert log.index(f"model {model}: loading weights on first use") < log.index(f"loaded model {model} ")
    # DEBUG request lines (the session server runs with TRITON_VLM_LOG_LEVEL=DEBUG)
    assert re.search(r"DEBUG model llava: request image 640x480, prompt \d+ chars, max_tokens 3, batch of \d+: "
                     r"\d+ prompt \+ \d+ generated tokens, (stop|length), [0-9.]+s", log)
    assert re.search(r"DEBUG model llava_stream: request \S+: \d+ prompt \+ \d+ generated tokens, (stop|length), "
                     r"first token after [0-9.]+s", log)


def test_readme_and_docs_describe_the_metrics() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    for name in ("triton_vlm_time_to_first_token_seconds", "triton_vlm_time_per_output_token_seconds",
                 "triton_vlm_batch_size", "triton_vlm_model_loaded", "8002", "/metrics", "--profile monitoring",
                 "dashboard-preview", "histogram_quantile"):
        assert name in docs, name
    assert "docs/dashboard.png" in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "dashboard.png").read_bytes().startswith(b"\x89PNG")


def test_a_stub_asked_for_its_stacks_prints_them_and_serves_on(triton: RunningServer,
                                                                sample_image_bytes: bytes) -> None:
    """What the launcher's stop does to the stubs of a server that does not exit in time: every thread's Python
    stack lands in Triton's log (the engine model's response loop among them), and the stub is unharmed."""
    from triton_vlm.launcher.procfs import dump_stub_stacks

    assert triton.server.process is not None
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        assert "".join(client.stream("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=2))
        loop_frame = re.compile(r'File ".*backend/responses\.py", line \d+ in _run')
        before = len(loop_frame.findall(triton.log()))
        asked = dump_stub_stacks(triton.server.process.pid)
        assert {stub.model for stub in asked} >= {"llava", "llava_stream"}
        deadline = time.monotonic() + 30
        while len(loop_frame.findall(triton.log())) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        log = triton.log()
        assert len(loop_frame.findall(log)) > before, log[-3000:]
        assert re.search(r"Thread 0x[0-9a-f]+ .*\(most recent call first\)", log)
        assert "".join(client.stream("llava", sample_image_bytes, PROMPTS["llava"], max_tokens=2))


def test_an_engine_request_splits_its_first_token_into_phases(triton: RunningServer,
                                                               sample_image_bytes: bytes) -> None:
    """``triton_vlm_first_token_phase_seconds{phase}`` counts every phase of a streamed engine request, and its
    debug line names them: together from the request's arrival to its first piece leaving."""
    from triton_vlm.observability.phases import FIRST_TOKEN_PHASES, PHASE_METRIC

    def counts() -> dict[str, float]:
        samples = parse_metrics(triton.metrics())
        return {phase: value_of(samples, f"{PHASE_METRIC}_count", model="llava_stream", phase=phase) or 0.0
                for phase in FIRST_TOKEN_PHASES}

    before = counts()
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        assert "".join(client.stream("llava", sample_image_bytes, "Split this one.", max_tokens=4))
    after = counts()
    assert all(after[phase] - before[phase] >= 1 for phase in FIRST_TOKEN_PHASES), (before, after)
    line = re.compile(r"model llava_stream: request \S+: \d+ prompt \+ 4 generated tokens, length, first token "
                      r"after ([\d.]+)s \((.*?)\), ([\d.]+)s in all")
    deadline = time.monotonic() + 10
    while not (found := line.findall(triton.log())) and time.monotonic() < deadline:
        time.sleep(0.1)
    first, split, total = found[-1]
    phases = dict(part.split(" ") for part in split.split(", "))
    assert list(phases) == list(FIRST_TOKEN_PHASES)
    elapsed = sum(float(seconds) for seconds in phases.values())
    assert float(first) - 0.002 <= elapsed <= float(total) + 0.002
