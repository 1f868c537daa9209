"""triton-vlm infer's output (plain text for pipes, --json for scripts, a spinner and a summary on a terminal),
--retries, and triton-vlm status, against the scripted HTTP stand-in for Triton."""

from __future__ import annotations

import io
import json
import os
import pty
import threading
import time
from collections.abc import Iterator

import pytest

from triton_vlm.cli.main import main
from triton_vlm.cli.output import Spinner, loading_message, print_result
from triton_vlm.client import InferenceResult
from triton_vlm.runtime import VLMRuntime

from .fake_triton import FakeTriton, answer
from .helpers import ROOT, SAMPLE_IMAGE, free_port

METRICS_LOADING = b'triton_vlm_model_loaded{model="llava"} 0\ntriton_vlm_model_loaded{model="kosmos2"} 1\n'


@pytest.fixture(autouse=True)
def in_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.fixture
def fake() -> Iterator[FakeTriton]:
    port = free_port()
    server = FakeTriton(port, routes=_status_routes(), delay=0.0).start()
    yield server
    server.stop()


def _status_routes() -> dict[str, object]:
    config = {"name": "llava", "max_batch_size": 8, "instance_group": [{"name": "llava_0", "kind": "KIND_CPU",
                                                                       "count": 1}]}
    return {
        "/metrics": (200, METRICS_LOADING),
        "/v2": {"name": "triton", "version": "2.51.0", "extensions": []},
        "/v2/health/ready": (200, b""),
        "/v2/repository/index": [{"name": "llava", "version": "1", "state": "READY"},
                                 {"name": "kosmos2", "version": "1", "state": "READY"}],
        "/v2/models/llava/config": config,
        "/v2/models/kosmos2/config": {**config, "name": "kosmos2"},
        "/v2/models/llava/ready": (200, b""),
        "/v2/models/kosmos2/ready": (200, b""),
    }


def _infer_args(url: str, *extra: str) -> list[str]:
    return ["infer", "--model", "llava", "--image", str(SAMPLE_IMAGE), "--prompt", "What is this?", "--url", url,
            *extra]


# -- plain and JSON ---------------------------------------------------------------------------------------------
def test_piped_output_is_only_the_text(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer_args(f"127.0.0.1:{fake.port}")) == 0
    captured = capsys.readouterr()
    assert captured.out == "a house\n" and captured.err == ""


def test_json_output(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer_args(f"127.0.0.1:{fake.port}", "--json", "--max-tokens", "3")) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"text", "generated_tokens", "prompt_tokens", "finish_reason", "latency_s"}
    assert (data["text"], data["generated_tokens"], data["prompt_tokens"], data["finish_reason"]) == (
        "a house", 3, 7, "stop")
    assert 0 < data["latency_s"] < 10


def test_json_output_direct(capsys: pytest.CaptureFixture[str], llava_runtime: VLMRuntime) -> None:
    from triton_vlm.direct import direct_infer

    expected = direct_infer(llava_runtime, SAMPLE_IMAGE, "What is this?", max_tokens=4)
    assert main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(SAMPLE_IMAGE), "--prompt",
                 "What is this?", "--max-tokens", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == expected.text and data["generated_tokens"] == len(expected.token_ids)
    assert data["prompt_tokens"] == expected.prompt_tokens and data["finish_reason"] == expected.finish_reason


def test_json_keeps_unicode(capsys: pytest.CaptureFixture[str]) -> None:
    print_result(InferenceResult("maison ✓", 2, 3, "stop", 0.5), model="m", as_json=True)
    assert json.loads(capsys.readouterr().out)["text"] == "maison ✓"


def test_retries_flag_waits_for_a_starting_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    server = FakeTriton(port).start(after=0.8)
    try:
        assert main(_infer_args(f"127.0.0.1:{port}", "--retries", "8")) == 0
        assert capsys.readouterr().out == "a house\n"
    finally:
        server.stop()


def test_timeout_flag(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    server = FakeTriton(port, delay=1.5).start()
    try:
        assert main(_infer_args(f"127.0.0.1:{port}", "--timeout", "0.3")) == 1
        assert capsys.readouterr().err.startswith(f"error: no answer from 127.0.0.1:{port} within 0.3s")
    finally:
        server.stop()


# -- on a terminal ------------------------------------------------------------------------------------------------
def _run_on_a_terminal(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run the CLI in-process with stdout and stderr on a pseudo-terminal; returns (code, what the screen got)."""
    master, slave = pty.openpty()
    screen = io.BytesIO()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            screen.write(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    terminal = os.fdopen(slave, "w", buffering=1, encoding="utf-8")
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr("sys.stderr", terminal)
    try:
        code = main(argv)
        terminal.flush()
        time.sleep(0.2)
    finally:
        monkeypatch.undo()
        terminal.close()
        reader.join(timeout=5)
        os.close(master)
    return code, screen.getvalue().decode("utf-8", errors="replace")


def test_terminal_gets_a_spinner_while_weights_load_then_text_and_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = FakeTriton(port, routes=_status_routes(), delay=1.0).start()
    try:
        code, screen = _run_on_a_terminal(_infer_args(f"127.0.0.1:{port}", "--metrics-url",
                                                      f"http://127.0.0.1:{port}/metrics"), monkeypatch)
    finally:
        server.stop()
    assert code == 0
    assert "loading llava's weights on this first request (this can take a while)" in screen
    assert any(frame in screen for frame in "⠋⠙⠹⠸")
    assert "\r\x1b[2K" in screen  # the spinner line is erased before the answer
    answer_at = screen.index("a house")
    assert screen.rindex("\x1b[2K") < answer_at
    assert "llava · 3 tokens (7 prompt) · stop ·" in screen[answer_at:]


def test_terminal_without_a_load_just_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loading_message("kosmos2", None) == "waiting for kosmos2"
    port = free_port()
    server = FakeTriton(port, routes=_status_routes()).start()
    try:
        assert loading_message("kosmos2", f"http://127.0.0.1:{port}/metrics") == "waiting for kosmos2"
        assert loading_message("llava", f"http://127.0.0.1:{port}/metrics").startswith("loading llava's weights")
    finally:
        server.stop()
    assert loading_message("llava", f"http://127.0.0.1:{free_port()}/metrics") == "waiting for llava"


def test_json_on_a_terminal_has_no_spinner(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = FakeTriton(port, routes=_status_routes(), delay=0.6).start()
    try:
        code, screen = _run_on_a_terminal(_infer_args(f"127.0.0.1:{port}", "--json"), monkeypatch)
    finally:
        server.stop()
    assert code == 0 and "\x1b" not in screen
    assert json.loads(screen.strip())["text"] == "a house"


def test_spinner_stays_quiet_for_quick_answers() -> None:
    stream = io.StringIO()
    with Spinner(stream, lambda: "never asked", delay=0.5):
        pass
    assert stream.getvalue() == ""
    with Spinner(stream, lambda: 1 / 0, delay=0.01, interval=0.01) as spinner:  # type: ignore[arg-type,return-value]
        time.sleep(0.1)
    assert spinner.shown and "waiting for the answer" in stream.getvalue()
    assert stream.getvalue().endswith("\r\x1b[2K")


# -- status ------------------------------------------------------------------------------------------------------
def test_status_command(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    url, metrics = f"127.0.0.1:{fake.port}", f"http://127.0.0.1:{fake.port}/metrics"
    assert main(["status", "--url", url, "--metrics-url", metrics]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"server   {url} (http)  triton 2.51.0  live, ready")
    assert "not loaded (loads on first request)" in out and "loaded" in out
    assert main(["status", "--url", url, "--metrics-url", metrics, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["kosmos2", "llava"]
    assert data["models"][1]["weights_loaded"] is False and data["models"][0]["weights_loaded"] is True
    assert data["models"][1]["instances"] == ["1x CPU"] and data["models"][1]["max_batch_size"] == 8


def test_status_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    routes = _status_routes()
    routes["/v2/models/kosmos2/ready"] = (400, {"error": "not ready"})
    server = FakeTriton(port, routes=routes).start()
    try:
        assert main(["status", "--url", f"127.0.0.1:{port}", "--metrics-url",
                     f"http://127.0.0.1:{port}/metrics"]) == 3
        assert "kosmos2" in capsys.readouterr().out
    finally:
        server.stop()
    assert main(["status", "--url", f"127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot reach triton-vlm server")


def test_infer_still_answers_for_models_it_was_asked(fake: FakeTriton, capsys: pytest.CaptureFixture[str]) -> None:
    """The model name goes to Triton's route (the stand-in answers with the model it was asked)."""
    fake.script = lambda path, attempt: (200, answer(path.split("/")[3], text=path.split("/")[3]))
    assert main(_infer_args(f"127.0.0.1:{fake.port}")) == 0
    assert capsys.readouterr().out == "llava\n"
