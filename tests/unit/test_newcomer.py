"""What a newcomer tripped on (issue 25), one test (or a few) per item: each failed before its fix."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.metadata
import json
import math
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from triton_vlm.cli.main import _parser, main
from triton_vlm.config import ModelSettings, WeightsConfig

from .fake_triton import FakeTriton
from .helpers import ROOT, SAMPLE_IMAGE, free_port


@pytest.fixture(autouse=True)
def in_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("TRITON_VLM_METRICS_URL", raising=False)


def _routes(metrics: bytes = b"", decoupled: bool = False) -> dict[str, Any]:
    config = {"name": "llava", "max_batch_size": 8,
              "instance_group": [{"name": "llava_0", "kind": "KIND_CPU", "count": 1}],
              **({"model_transaction_policy": {"decoupled": True}} if decoupled else {})}
    return {
        "/metrics": (200, metrics),
        "/v2": {"name": "triton", "version": "2.51.0", "extensions": []},
        "/v2/health/ready": (200, b""),
        "/v2/health/live": (200, b""),
        "/v2/repository/index": [{"name": "llava", "version": "1", "state": "READY"}],
        "/v2/models/llava/config": config,
        "/v2/models/llava/ready": (200, b""),
        "/v2/models/llava_stream/config": {**config, "name": "llava_stream",
                                           "model_transaction_policy": {"decoupled": True}},
    }


@pytest.fixture
def fake() -> Iterator[FakeTriton]:
    server = FakeTriton(free_port(), routes=_routes()).start()
    yield server
    server.stop()


# -- status --url on another port read :8002 (another server's numbers) -----------------------------------------
def test_metrics_address_is_derived_only_for_default_ports() -> None:
    from triton_vlm.cli.addresses import metrics_address, split_url

    assert metrics_address("localhost:8000", None).url == "http://localhost:8002/metrics"
    assert metrics_address("grpc://10.0.0.5:8001", None).url == "http://10.0.0.5:8002/metrics"
    assert metrics_address("myhost", None).url == "http://myhost:8002/metrics"
    other = metrics_address("http://10.0.0.5:9000/", None)
    assert other.url is None and "--metrics-url" in other.source and "9000" in other.source
    given = metrics_address("h:9000", "http://h:9002/metrics")
    assert given.url == "http://h:9002/metrics" and "--metrics-url" in given.source
    assert split_url("[::1]:8000") == ("[::1]", 8000) and split_url("grpc://h") == ("h", None)


def test_status_on_other_ports_says_it_did_not_read_metrics(fake: FakeTriton, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    # The old code read http://127.0.0.1:8002/metrics here: whatever server listens there, not this one.
    assert main(["status", "--url", f"127.0.0.1:{fake.port}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metrics_url"] is None and "--metrics-url" in data["metrics_source"]
    assert data["models"][0]["weights_loaded"] is None
    assert main(["status", "--url", f"127.0.0.1:{fake.port}"]) == 0
    assert "metrics  not read:" in capsys.readouterr().out


def test_status_says_which_metrics_address_it_used(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = f"http://127.0.0.1:{fake.port}/metrics"
    assert main(["status", "--url", f"127.0.0.1:{fake.port}", "--metrics-url", metrics]) == 0
    assert f"metrics  {metrics}  [from --metrics-url]" in capsys.readouterr().out


# -- dashboard-preview --url passed the HTTP address as the gRPC one ------------------------------------------------
def test_grpc_address_is_derived_from_the_http_one() -> None:
    from triton_vlm.cli.addresses import grpc_address

    assert grpc_address("localhost:8000", None).url == "localhost:8001"
    assert grpc_address("http://h:8000", "h:9001").url == "h:9001"
    assert grpc_address("h:18000", None).url is None


def test_dashboard_preview_load_gets_the_grpc_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from triton_vlm.observability import dashboard

    seen: dict[str, Any] = {}

    def run_load(http_url: str, grpc_url: str, models: list[str], **_: Any) -> int:
        seen.update(http=http_url, grpc=grpc_url)
        return 0

    monkeypatch.setattr(dashboard, "run_load", run_load)
    monkeypatch.setattr(dashboard, "record", lambda *a, **k: dashboard.Recording([0.0], [[]]))
    monkeypatch.setattr(dashboard.time, "sleep", lambda s: None)
    out = tmp_path / "preview.png"
    assert main(["dashboard-preview", "--url", "localhost:8000", "--metrics-url", "http://localhost:8002/metrics",
                 "--seconds", "1", "--output", str(out), "--json"]) == 0
    assert seen == {"http": "localhost:8000", "grpc": "localhost:8001"}


def test_dashboard_preview_on_other_ports_needs_grpc_url(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["dashboard-preview", "--url", "localhost:18000", "--metrics-url", "http://localhost:18002/metrics",
                 "--output", str(tmp_path / "p.png")]) == 1
    assert "--grpc-url" in capsys.readouterr().err


def test_collect_refuses_a_load_without_a_grpc_address() -> None:
    from triton_vlm.observability.dashboard import collect

    with pytest.raises(ValueError, match="gRPC"):
        collect("http://127.0.0.1:1/metrics", seconds=0, http_url="127.0.0.1:1")


# -- bench printed `nanms` for the baseline's TTFT ------------------------------------------------------------------
def test_bench_table_prints_a_dash_for_what_was_not_measured() -> None:
    from triton_vlm.bench.workload import RunResult, format_table

    row = RunResult(concurrency=1, requests=4, seconds=2.0, output_tokens=20, output_tok_s=10.0, requests_s=2.0,
                    ttft_p50_s=math.nan, ttft_p99_s=math.nan, itl_p50_s=0.02, itl_p99_s=0.03)
    table = format_table("baseline", [row])
    assert "nan" not in table
    assert table.splitlines()[-1].split()[3:7] == ["-", "-", "20.00ms", "30.00ms"]


# -- no --version ------------------------------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("triton-vlm 0.1.0 (") and f"Python {sys.version_info[0]}." in out
    assert "tritonserver 2.51.0 from nvidia-pytriton 0.7.0" in out and out.count("\n") == 1


# -- --preload without weights: a segfault report in the log, the reason buried ---------------------------------
def test_a_failed_start_disables_crash_reports_and_tells_the_launcher(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    from triton_vlm.backend.stub_logging import STARTUP_ERRORS_ENV, startup_failed

    errors = tmp_path / "errors.txt"
    monkeypatch.setenv(STARTUP_ERRORS_ENV, str(errors))
    faulthandler.enable()
    try:
        startup_failed("llava", RuntimeError("model 'llava': cannot load weights\nProvide them by one of: ..."))
        assert not faulthandler.is_enabled()  # the stub's native teardown would print a segfault report
        startup_failed("kosmos2", MemoryError("out of memory"))
    finally:
        faulthandler.disable()
    assert errors.read_text() == ("model 'llava': cannot load weights Provide them by one of: ...\n"
                                  "kosmos2: out of memory\n")


def test_serve_says_why_models_failed_at_start_last(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import triton_vlm.cli.main as cli
    import triton_vlm.launcher as launcher
    from triton_vlm.backend.stub_logging import STARTUP_ERRORS_ENV

    class FailingServer:
        def __init__(self, options: Any) -> None:
            self.options = options
            self.stopped = 0

        def start(self) -> None:
            path = Path(self.options.extra_env[STARTUP_ERRORS_ENV])
            for _ in range(2):  # two instances of one model give the same reason: said once
                with path.open("a") as errors:
                    errors.write("llava: model 'llava': cannot load weights; (3) use --tiny\n")

        def wait_until_ready(self) -> None:
            raise launcher.LauncherError("tritonserver exited (code 1) before it was ready; see its log above")

        def stop(self) -> None:
            self.stopped += 1

    monkeypatch.setattr(launcher, "TritonServer", FailingServer)
    monkeypatch.setattr(cli, "_models_without_weights", lambda options: [])
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert main(["serve", "--preload", "--models", "llava"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("error: the server did not start: tritonserver exited (code 1)")
    assert err[-1] == "  llava: model 'llava': cannot load weights; (3) use --tiny"


# -- the load-failure hint named huggingface-cli, which huggingface_hub no longer has ------------------------------
def test_the_download_command_named_in_hints_is_installed() -> None:
    from triton_vlm.loading import _missing_weights_message

    settings = ModelSettings(model_name="moondream2", family="moondream2",
                             weights=WeightsConfig(hf_model_id="vikhyatk/moondream2", revision="2025-06-21"))
    message = _missing_weights_message(settings, "vikhyatk/moondream2", "2025-06-21", OSError("offline"))
    assert "`hf download vikhyatk/moondream2 --revision 2025-06-21`" in message
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("huggingface_hub")}
    assert "hf" in scripts and "huggingface-cli" not in message
    source = (ROOT / "src" / "triton_vlm" / "loading.py").read_text()
    assert "huggingface-cli" not in source


# -- 7 models READY without weights; status said "not loaded" ------------------------------------------------------
def test_weights_availability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_vlm.availability import weights_availability

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    base = ModelSettings(model_name="llava", family="llava",
                         weights=WeightsConfig(hf_model_id="llava-hf/llava-1.5-7b-hf"))
    assert weights_availability(base, hub_answers=lambda: False).where == "missing"
    assert weights_availability(base, hub_answers=lambda: True).where == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_availability(base, hub_answers=lambda: True).where == "missing"
    snapshot = tmp_path / "hf" / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc")
    (snapshot / "snapshots" / "abc" / "config.json").write_text("{}")
    assert weights_availability(base, hub_answers=lambda: False).where == "cache"
    checkpoint = tmp_path / "ckpt"
    local = base.with_overrides(local_path=str(checkpoint))
    assert weights_availability(local).where == "missing"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert weights_availability(local).where == "local_path"
    assert weights_availability(base.with_overrides(tiny=True)).where == "tiny"


def test_the_default_repository_without_weights_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRITON_VLM_TINY", raising=False)
    from triton_vlm.availability import missing_weights_note, repository_availability
    from triton_vlm.launcher.repository import companions, default_model_repository, servable_models

    repository = default_model_repository()
    public = servable_models(repository)
    models = public + [c for m in public for c in companions(repository, m) if c not in public]
    probes: list[int] = []
    found = repository_availability(repository, models, hub_answers=lambda: probes.append(1) or False)
    assert len(found) == len(models) == 14 and not any(f.available for f in found) and probes == []  # offline: no probe
    note = missing_weights_note(found)
    assert note.startswith("no weights here for ") and all(m in note.splitlines()[0] for m in models)
    assert "hf download" in note and "TRITON_VLM_" in note and "_LOCAL_PATH=" in note and "--tiny" in note
    assert "Hugging Face Hub" in note and note.count("\n  ") >= 3


def test_serve_prints_the_missing_weights_note_after_ready(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import triton_vlm.cli.main as cli
    import triton_vlm.launcher as launcher
    from triton_vlm.availability import WeightsAvailability

    class ReadyServer:
        models = ["llava"]
        http_url, grpc_url, metrics_url = "127.0.0.1:8000", "127.0.0.1:8001", "http://127.0.0.1:8002/metrics"

        def __init__(self, options: Any) -> None:
            self.options = options

        def start(self) -> None: ...
        def wait_until_ready(self) -> None: ...
        def wait(self) -> int:
            return 0

        def stop(self) -> None: ...

    monkeypatch.setattr(launcher, "TritonServer", ReadyServer)
    monkeypatch.setattr(cli, "_models_without_weights",
                        lambda options: [WeightsAvailability("llava", "missing", "llava-hf/x", "offline")])
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert main(["serve", "--models", "llava"]) == 0
    out = capsys.readouterr().out
    assert out.index("Ctrl-C to stop") < out.index("[triton-vlm] note: no weights here for llava")


def test_status_says_weights_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = (b'triton_vlm_model_loaded{model="llava"} 0\n'
               b'triton_vlm_model_weights_available{model="llava"} 0\n'
               b'triton_vlm_model_load_failures_total{model="llava"} 2\n')
    server = FakeTriton(free_port(), routes=_routes(metrics)).start()
    try:
        url = f"127.0.0.1:{server.port}"
        main(["status", "--url", url, "--metrics-url", f"http://{url}/metrics"])
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "weights unavailable (2 failed loads)" in out and "not loaded" not in out


def test_backend_exports_weights_availability(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from .test_backend import fake_pb_utils, initialize

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    for name in ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    backend = importlib.import_module("triton_vlm.backend.python_model")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRITON_VLM_TINY", raising=False)
    try:
        missing = initialize(backend, "llava", {"model_family": "llava"})
        assert missing.metrics.weights_available.value == 0 and missing.metrics.loaded.value == 0
        tiny = initialize(backend, "llava", {"model_family": "llava", "tiny": "1"})
        assert tiny.metrics.weights_available.value == 1
    finally:
        for name in ("triton_vlm.backend", "triton_vlm.backend.python_model", "triton_vlm.backend.metrics"):
            sys.modules.pop(name, None)
    stream = (ROOT / "src" / "triton_vlm" / "backend" / "stream_model.py").read_text()
    assert "self.metrics.note_weights(self.runtime)" in stream


# -- Triton counts an error answer as a success (#7713): panels and status use triton_vlm_request_errors_total ---
def _dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "triton-vlm.json").read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    return [(p.get("title", ""), t["expr"]) for p in panels(board["panels"]) for t in p.get("targets", [])]


def test_dashboard_errors_come_from_our_counter() -> None:
    exprs = _dashboard_exprs()
    requests = [e for title, e in exprs if title == "Requests / s"]
    assert any("triton_vlm_request_errors_total" in e for e in requests)
    errors = [e for title, e in exprs if "error" in title.lower() or "fail" in title.lower()]
    assert errors and all("nv_inference_request_success" not in e for e in errors)
    docs = (ROOT / "docs" / "observability.md").read_text()
    assert "7713" in docs and "triton_vlm_request_errors_total" in docs


def test_status_counts_error_answers_as_failed() -> None:
    from triton_vlm.observability.scrape import parse_metrics
    from triton_vlm.observability.status import ModelStatus, _read_metrics

    model = ModelStatus(name="llava", version="1", state="READY", ready=True)
    _read_metrics(parse_metrics('nv_inference_request_success{model="llava",version="1"} 5\n'
                                'nv_inference_request_failure{model="llava",reason="REJECTED",version="1"} 1\n'
                                'triton_vlm_request_errors_total{model="llava"} 2\n'), model)
    assert (model.requests, model.failed_requests) == (5, 3)


# -- infer --help; --grpc at the HTTP port; HTTP to a _stream model --------------------------------------------------
def test_every_infer_flag_has_help() -> None:
    parser = _parser()
    infer = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["infer"]
    missing = [a.dest for a in infer._actions if not a.help]
    assert missing == []


def test_grpc_at_the_http_port_names_the_port_to_use(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--grpc", "--url", f"127.0.0.1:{fake.port}", "--model", "llava", "--image",
                 str(SAMPLE_IMAGE), "--prompt", "hi", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "is Triton's HTTP port, not its gRPC port" in err and "8001" in err and "leave out --grpc" in err


def test_a_stream_model_answers_over_grpc_and_names_the_address_it_cannot_reach(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A whole answer from ``llava_stream`` (a decoupled model, which plain HTTP infer cannot ask) is one gRPC stream
    to the same host's port 8001: where nothing listens there, the error says which address it tried."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8001)) == 0:
            pytest.skip("something listens on 127.0.0.1:8001")
    server = FakeTriton(free_port(), routes=_routes()).start()
    try:
        assert main(["infer", "--url", f"127.0.0.1:{server.port}", "--model", "llava_stream", "--image",
                     str(SAMPLE_IMAGE), "--prompt", "hi"]) == 1
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "cannot reach" in err and "127.0.0.1:8001" in err and "Traceback" not in err
    assert [r for r in server.requests if r[0] == "POST"] == []  # not a plain HTTP infer: Triton refuses those for decoupled models


# -- docs: the 404 of /v2/models; the admin key in `ps` ----------------------------------------------------------------
def test_readme_troubleshooting_explains_the_v2_models_404() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Troubleshooting"):]
    assert "/v2/models" in section and "404" in section
    for alternative in ("triton-vlm status", "/v1/models", "/v2/repository/index", "triton-vlm-admin-key"):
        assert alternative in section


def test_docs_say_the_admin_key_shows_in_ps_and_how_to_hide_it() -> None:
    docs = (ROOT / "docs" / "reliability.md").read_text()
    assert "ps" in docs and "hidepid" in docs and "TRITON_VLM_ADMIN_KEY" in docs
