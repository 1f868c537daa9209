"""``./triton_start.sh`` on simulated hosts: fake ``nvidia-smi`` / ``docker`` executables on ``PATH``.

Docker modes run the fake ``docker compose ... up`` for real (it answers ``/v2/health/ready`` like the
container); the cases that pick the embedded server use ``--dry-run`` (tests/integration starts it for real).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, free_port
from tests.unit.fakehost import FakeHost, make_host

SCRIPT = str(ROOT / "triton_start.sh")


def _ports() -> list[str]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    return ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


def run_script(host: FakeHost, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], env=host.env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def run_until_ready(host: FakeHost, *args: str) -> tuple[int, str]:
    """Start the script, wait for its endpoints line, SIGTERM it; (exit code, output)."""
    process = subprocess.Popen([SCRIPT, *args], env=host.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, "".join(lines) + rest


def test_gpu_docker_with_nvidia_runtime_runs_gpu_compose(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=True)
    ports = _ports()
    code, output = run_until_ready(host, "--tiny", "--models", "llava", *ports)
    assert code == 0, output
    assert "mode: gpu" in output and "NVIDIA H100" in output
    (up,) = host.compose_up_calls()
    assert up["tool"] == "docker"
    assert up["argv"] == ["compose", "-f", str(ROOT / "docker-compose.yml"), "up"]
    assert up["env"] == {"TRITON_HTTP_PORT": ports[1], "TRITON_GRPC_PORT": ports[3],
                         "TRITON_METRICS_PORT": ports[5], "TRITON_HOST": "127.0.0.1",
                         "TRITON_VLM_MODELS": "llava", "TRITON_VLM_TINY": "1"}
    assert f"HTTP     http://127.0.0.1:{ports[1]}" in output
    assert f"metrics  http://127.0.0.1:{ports[5]}/metrics" in output
    assert "fake container started" in output  # compose's own output is in the foreground
    # SIGTERM reached docker compose once, which then stopped the container.
    assert [c["signal"] for c in host.calls("docker") if "signal" in c] == ["SIGTERM"]


def test_docker_without_gpu_runs_cpu_compose(tmp_path: Path) -> None:
    host = make_host(tmp_path, docker="up")
    ports = _ports()
    code, output = run_until_ready(host, *ports)
    assert code == 0, output
    assert "mode: cpu" in output and "nvidia-smi is not installed" in output
    (up,) = host.compose_up_calls()
    assert up["argv"] == ["compose", "-f", str(ROOT / "docker-compose-cpu.yml"), "up"]
    assert "TRITON_VLM_TINY" not in up["env"] and up["env"]["TRITON_VLM_MODELS"] == ""
    assert f"HTTP     http://127.0.0.1:{ports[1]}" in output


def test_standalone_docker_compose_is_used_when_the_plugin_is_missing(tmp_path: Path) -> None:
    host = make_host(tmp_path, docker="up", compose_plugin=False, standalone_compose=True)
    code, output = run_until_ready(host, "--mode", "cpu", *_ports())
    assert code == 0, output
    (up,) = host.compose_up_calls()
    assert up["tool"] == "docker-compose"
    assert up["argv"] == ["-f", str(ROOT / "docker-compose-cpu.yml"), "up"]


def test_no_docker_runs_embedded(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    result = run_script(host, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mode: embedded (no Docker: the embedded tritonserver from the Python wheel runs on the CPU)" \
        in result.stdout
    assert "would run: triton-vlm serve" in result.stdout
    assert "note:" not in result.stdout  # no Docker at all is not worth a warning


def test_gpu_without_docker_runs_embedded_on_the_gpu(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok")
    result = run_script(host, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mode: embedded" in result.stdout and "runs on NVIDIA H100" in result.stdout


def test_gpu_and_docker_without_nvidia_runtime_runs_embedded(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=False)
    result = run_script(host, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mode: embedded" in result.stdout and "Docker has no NVIDIA runtime" in result.stdout
    assert "NVIDIA Container Toolkit" in result.stdout
    assert not host.compose_up_calls()


def test_docker_daemon_down_falls_back_to_embedded_and_says_why(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="down", nvidia_runtime=True)
    result = run_script(host, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mode: embedded (Docker unusable" in result.stdout
    assert "note: not using Docker: Docker is installed but its daemon is not running" in result.stdout
    assert "sudo systemctl start docker" in result.stdout
    assert "Is the docker daemon running?" in result.stdout  # docker's own words, quoted


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_docker_daemon_down_fails_an_explicit_docker_mode(tmp_path: Path, mode: str) -> None:
    host = make_host(tmp_path, gpu="ok", docker="down", nvidia_runtime=True)
    result = run_script(host, "--mode", mode, *_ports())
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: --mode {mode}")
    assert "daemon is not running" in result.stderr and "--mode embedded" in result.stderr
    assert not host.compose_up_calls()


def test_docker_permission_denied_is_explained(tmp_path: Path) -> None:
    host = make_host(tmp_path, docker="denied")
    result = run_script(host, "--mode", "cpu")
    assert result.returncode == 1
    assert "permission denied on the Docker socket" in result.stderr
    assert "usermod -aG docker" in result.stderr


def test_gpu_mode_without_a_gpu_driver_is_explained(tmp_path: Path) -> None:
    host = make_host(tmp_path, docker="up", nvidia_runtime=True)
    result = run_script(host, "--mode", "gpu")
    assert result.returncode == 1
    assert "error: --mode gpu needs an NVIDIA GPU" in result.stderr
    assert "no NVIDIA GPU driver found (nvidia-smi is not installed)" in result.stderr


def test_broken_gpu_driver_is_explained(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="broken", docker="up", nvidia_runtime=True)
    result = run_script(host, "--mode", "gpu")
    assert result.returncode == 1
    assert "the NVIDIA driver is not working: nvidia-smi failed (NVIDIA-SMI has failed" in result.stderr
    auto = run_script(host, "--dry-run")  # auto: a broken driver means no GPU, so Docker on CPU
    assert "mode: cpu" in auto.stdout


def test_gpu_mode_without_nvidia_runtime_is_explained(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=False)
    result = run_script(host, "--mode", "gpu")
    assert result.returncode == 1
    assert "Docker has no NVIDIA runtime" in result.stderr and "nvidia-ctk runtime configure" in result.stderr


def test_mode_overrides_detection(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=True)
    embedded = run_script(host, "--mode", "embedded", "--dry-run")
    assert "mode: embedded (--mode embedded" in embedded.stdout
    code, output = run_until_ready(host, "--mode", "cpu", *_ports())
    assert code == 0, output
    (up,) = host.compose_up_calls()
    assert up["argv"][2] == str(ROOT / "docker-compose-cpu.yml")


def test_mode_from_environment(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=True)
    result = subprocess.run([SCRIPT, "--dry-run"], env=host.env(TRITON_VLM_MODE="embedded"), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert "mode: embedded" in result.stdout


def test_compose_failure_is_reported(tmp_path: Path) -> None:
    host = make_host(tmp_path, gpu="ok", docker="up", nvidia_runtime=True, compose_up="fail")
    result = run_script(host, *_ports())
    assert result.returncode == 1
    assert 'could not select device driver "nvidia"' in result.stderr  # compose's own message, unfiltered
    assert "error: `docker compose -f" in result.stderr
    assert "exited with code 1" in result.stderr and "--mode embedded" in result.stderr


@pytest.mark.parametrize("mode", ["cpu", "embedded"])
def test_port_taken_is_explained(tmp_path: Path, mode: str) -> None:
    host = make_host(tmp_path, docker="up")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = _ports()
        while str(port) in ports:
            ports = _ports()
        ports[1] = str(port)
        result = run_script(host, "--mode", mode, *ports)
    assert result.returncode == 1
    assert f"error: HTTP port {port} is already in use" in result.stderr and "--http-port" in result.stderr
    assert not host.compose_up_calls()
