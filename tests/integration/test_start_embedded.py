"""``./triton_start.sh`` in embedded mode, for real: the wheel's tritonserver on free loopback ports, tiny
weights; SIGTERM ends it cleanly and leaves no tritonserver or stub behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from tests.conftest import ROOT, free_ports
from tests.unit.fakehost import make_host
from tests.unit.test_deploy_dockerfile import TRITON_CONTAINER, find
from tests.unit.test_deploy_helm import TRITON_METRICS

pytestmark = pytest.mark.integration


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _server_group(http: int) -> int | None:
    """The tritonserver serving ``http``; it leads its own process group, its Python stubs included."""
    found = subprocess.run(["pgrep", "-f", f"tritonserver.*--http-port={http}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_and_stop(args: list[str], env: dict[str, str], log_path: Path, http: int,
                 metrics: int) -> tuple[int, str, dict]:
    """Start the script, wait for /v2/health/ready, look around, SIGTERM it. (exit code, output, facts)."""
    facts: dict = {}
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(ROOT / "triton_start.sh"), *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
        try:
            # Every tiny model and its engine model (a dozen stubs) on a 2-core machine under load: minutes, not seconds.
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.25)
            # The script prints the endpoints after its own readiness check: wait for that too.
            while time.monotonic() < deadline and "Ctrl-C to stop" not in log_path.read_text():
                time.sleep(0.1)
            assert process.poll() is None, log_path.read_text()[-3000:]
            facts["server"] = json.loads(_get(f"http://127.0.0.1:{http}/v2"))
            facts["metrics"] = _get(f"http://127.0.0.1:{metrics}/metrics")
            facts["pgid"] = _server_group(http)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=90)
    return code, log_path.read_text(), facts


def _assert_gone(pgid: int | None) -> None:
    assert pgid is not None, "tritonserver was not found while it served"
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid), "tritonserver or one of its stubs outlived triton_start.sh"


def test_embedded_mode_starts_reports_and_stops_cleanly(tmp_path: Path) -> None:
    http, grpc, metrics = free_ports()
    args = ["--mode", "embedded", "--tiny", "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics)]
    code, output, facts = run_and_stop(args, dict(os.environ), tmp_path / "start.log", http, metrics)
    assert code == 0, output[-3000:]
    assert "mode: embedded (--mode embedded" in output
    assert f"HTTP     http://127.0.0.1:{http}" in output and f"gRPC     127.0.0.1:{grpc}" in output
    assert f"metrics  http://127.0.0.1:{metrics}/metrics" in output
    # The NVIDIA image the Dockerfile builds on carries the same Triton as the wheel.
    (base,) = find("FROM")
    assert base.endswith(f":{TRITON_CONTAINER[facts['server']['version']]}-py3"), facts["server"]
    # prometheus-adapter's rule (deploy/helm/examples) divides these two: the real server exports them.
    exported = {line.split("{")[0] for line in facts["metrics"].splitlines() if line and line[0] != "#"}
    assert exported >= TRITON_METRICS
    assert 'nv_inference_queue_duration_us{model="llava",version="1"}' in facts["metrics"]
    _assert_gone(facts["pgid"])


def test_fresh_machine_without_docker_falls_back_to_embedded(tmp_path: Path) -> None:
    """The README's first command on a host with no docker (and no nvidia-smi) on PATH."""
    host = make_host(tmp_path / "host")
    http, grpc, metrics = free_ports()
    args = ["--tiny", "--models", "llava", "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics)]
    env = host.env()
    code, output, facts = run_and_stop(args, env, tmp_path / "start.log", http, metrics)
    assert code == 0, output[-3000:]
    assert "mode: embedded (no Docker: the embedded tritonserver from the Python wheel runs on the CPU)" in output
    assert "ready: models llava" in output
    _assert_gone(facts["pgid"])
