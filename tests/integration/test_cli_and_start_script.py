"""The README's commands as a user runs them: ``./triton_start.sh`` and ``.venv/bin/triton-vlm infer``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, SAMPLE_IMAGE, free_ports
from tests.integration.conftest import RunningServer

from triton_client import TritonVLMClient
from triton_vlm.direct import direct_runtime
from triton_vlm.errors import ModelUnavailableError

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "triton-vlm"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)


def test_cli_infer_against_server_prints_only_the_text(triton: RunningServer) -> None:
    args = ["infer", "--model", "llava", "--image", str(SAMPLE_IMAGE), "--prompt", "What is this?",
            "--max-tokens", "8"]
    served = _run_cli(*args, "--url", triton.http_url)
    served_grpc = _run_cli(*args, "--url", triton.grpc_url, "--grpc")
    direct = _run_cli(*args, "--direct", "--tiny")
    assert served.returncode == 0, served.stderr
    runtime = direct_runtime("llava", tiny=True, device="cpu")
    (expected,) = runtime.generate([runtime.make_request(SAMPLE_IMAGE.read_bytes(), "What is this?",
                                                         max_tokens=8)])
    assert served.stdout == expected.text + "\n"  # type: ignore[union-attr]
    assert served_grpc.stdout == served.stdout
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == served.stdout


def test_cli_infer_reports_errors_plainly(triton: RunningServer, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(SAMPLE_IMAGE.read_bytes()[:500])
    result = _run_cli("infer", "--model", "llava", "--image", str(broken), "--prompt", "hi", "--url",
                      triton.http_url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: image:")


def _tritonserver_pids(port: int) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"tritonserver.*--http-port={port}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_start_script_serves_real_weights_config_and_stops_cleanly(tmp_path: Path) -> None:
    """Without --tiny the real checkpoints are configured; offline, the first request explains how to get
    them, the server keeps running, and SIGTERM stops everything."""
    http, grpc, metrics = free_ports()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), TRITON_VLM_MODE="embedded")
    with open(tmp_path / "start.log", "w") as log:  # the script writes to its own copy of the descriptor
        process = subprocess.Popen(
            [str(ROOT / "triton_start.sh"), "--models", "llava", "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    try:
        client = TritonVLMClient(f"127.0.0.1:{http}")
        client.wait_until_ready(timeout=180)
        with pytest.raises(ModelUnavailableError) as error:
            client.infer("llava", SAMPLE_IMAGE, "What is this?")
        message = str(error.value)
        assert "llava-hf/llava-1.5-7b-hf" in message
        assert "TRITON_VLM_LLAVA_LOCAL_PATH" in message and "--tiny" in message
        assert client.is_ready("llava")  # the failed load did not take the model down
        assert _tritonserver_pids(http), "tritonserver should be running"
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    output = (tmp_path / "start.log").read_text()
    assert code == 0, output[-3000:]
    assert "ready: models llava" in output and f"http://127.0.0.1:{http}" in output
    deadline = time.monotonic() + 10
    while _tritonserver_pids(http) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tritonserver_pids(http), "tritonserver outlived triton_start.sh"
