"""Host detection and the mode decision, with canned command outputs (no processes)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from triton_vlm.launcher.detect import HostReport, choose_mode, probe_docker, probe_gpus, probe_host
from triton_vlm.launcher.distribution import LauncherError

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0c8a2a8e)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1d9b3b9f)\n"


def fake(outputs: dict[tuple[str, ...], tuple[int, str, str]], on_path: Sequence[str]):
    """A (run, which) pair answering ``outputs[command[:2]]`` = (code, stdout, stderr)."""
    calls: list[list[str]] = []

    def run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(command))
        answer = outputs.get(tuple(command[:2]))
        if answer == "timeout":
            raise subprocess.TimeoutExpired(list(command), 20)
        code, out, err = answer or (0, "", "")
        return subprocess.CompletedProcess(list(command), code, out, err)

    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in on_path else None

    run.calls = calls  # type: ignore[attr-defined]
    return run, which


DOCKER_UP_NVIDIA = {("docker", "info"): (0, '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{}}\n', ""),
                    ("docker", "compose"): (0, "Docker Compose version v2.29.7\n", "")}
DOCKER_UP = {("docker", "info"): (0, '{"io.containerd.runc.v2":{},"runc":{}}\n', ""),
             ("docker", "compose"): (0, "Docker Compose version v2.29.7\n", "")}
DAEMON_DOWN = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
               "Is the docker daemon running?\n")
DOCKER_DOWN = {("docker", "info"): (1, "null\n", DAEMON_DOWN)}


def test_gpus_listed_by_nvidia_smi() -> None:
    run, which = fake({("nvidia-smi", "-L"): (0, H100, "")}, ["nvidia-smi"])
    assert probe_gpus(run, which) == (("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"), None)


@pytest.mark.parametrize("answer, on_path, problem", [
    (None, [], "no NVIDIA GPU driver found (nvidia-smi is not installed)"),
    ((9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", ""), ["nvidia-smi"],
     ("the NVIDIA driver is not working: nvidia-smi failed (NVIDIA-SMI has failed because it couldn't "
      "communicate with the NVIDIA driver.)")),
    ((18, "", "Failed to initialize NVML: Driver/library version mismatch\n"), ["nvidia-smi"],
     ("the NVIDIA driver is not working: nvidia-smi failed (Failed to initialize NVML: Driver/library version "
      "mismatch)")),
    ((0, "No devices found.\n", ""), ["nvidia-smi"], "nvidia-smi lists no GPU"),
    ("timeout", ["nvidia-smi"], "nvidia-smi did not answer within 20 s (is the NVIDIA driver hung?)"),
])
def test_gpu_problems_in_plain_words(answer, on_path, problem) -> None:
    run, which = fake({("nvidia-smi", "-L"): answer} if answer else {}, on_path)
    assert probe_gpus(run, which) == ((), problem)


def test_docker_with_nvidia_runtime() -> None:
    run, which = fake(DOCKER_UP_NVIDIA, ["docker"])
    assert probe_docker(run, which) == ("/usr/bin/docker", None, True, ("docker", "compose"), None)


def test_nvidia_hook_counts_as_runtime() -> None:
    run, which = fake(DOCKER_UP, ["docker", "nvidia-container-runtime-hook"])
    assert probe_docker(run, which)[2] is True


def test_docker_daemon_down() -> None:
    run, which = fake(DOCKER_DOWN, ["docker"])
    docker, problem, nvidia, compose, _ = probe_docker(run, which)
    assert docker == "/usr/bin/docker" and not nvidia and compose == ()
    assert problem is not None and problem.startswith("Docker is installed but its daemon is not running")
    assert "[docker said: Cannot connect to the Docker daemon" in problem and "null" not in problem
    assert run.calls == [["docker", "info", "--format", "{{json .Runtimes}}"]]  # type: ignore[attr-defined]


def test_docker_daemon_timeout() -> None:
    run, which = fake({("docker", "info"): "timeout"}, ["docker"])
    assert probe_docker(run, which)[1] == "the Docker daemon did not answer within 20 s"


def test_compose_plugin_missing_then_standalone() -> None:
    outputs = {("docker", "info"): DOCKER_UP[("docker", "info")],
               ("docker", "compose"): (1, "", "docker: unknown command: docker compose\n")}
    run, which = fake(outputs, ["docker", "docker-compose"])
    assert probe_docker(run, which)[3:] == (("docker-compose",), None)
    run, which = fake(outputs, ["docker"])
    compose, problem = probe_docker(run, which)[3:]
    assert compose == () and problem is not None and "docker-compose-plugin" in problem


def test_probe_host_combines() -> None:
    run, which = fake({**DOCKER_UP_NVIDIA, ("nvidia-smi", "-L"): (0, H100, "")}, ["docker", "nvidia-smi"])
    host = probe_host(run, which)
    assert host.gpu and host.docker_usable and host.nvidia_runtime
    assert choose_mode("auto", host).mode == "gpu"


GPU = dict(gpus=("NVIDIA H100",), gpu_problem=None)
DOCKER = dict(docker="/usr/bin/docker", docker_problem=None, compose=("docker", "compose"))
DOWN = dict(docker="/usr/bin/docker", docker_problem="Docker is installed but its daemon is not running")


@pytest.mark.parametrize("host, mode", [
    (HostReport(**GPU, **DOCKER, nvidia_runtime=True), "gpu"),
    (HostReport(**DOCKER), "cpu"),
    (HostReport(**GPU, **DOCKER, nvidia_runtime=False), "embedded"),
    (HostReport(**GPU), "embedded"),
    (HostReport(), "embedded"),
    (HostReport(**GPU, **DOWN), "embedded"),
    (HostReport(docker="/usr/bin/docker", docker_problem=None, compose=(), compose_problem="no compose"),
     "embedded"),
])
def test_auto_mode(host: HostReport, mode: str) -> None:
    assert choose_mode("auto", host).mode == mode


def test_auto_explains_an_unusable_docker() -> None:
    plan = choose_mode("auto", HostReport(**DOWN))
    assert plan.notes == ("not using Docker: Docker is installed but its daemon is not running",)
    assert choose_mode("auto", HostReport()).notes == ()


@pytest.mark.parametrize("mode", ["gpu", "cpu", "embedded"])
def test_explicit_mode_wins_when_possible(mode: str) -> None:
    assert choose_mode(mode, HostReport(**GPU, **DOCKER, nvidia_runtime=True)).mode == mode


@pytest.mark.parametrize("mode, host, words", [
    ("gpu", HostReport(**DOCKER, nvidia_runtime=True), "nvidia-smi is not installed"),
    ("gpu", HostReport(**GPU, **DOCKER), "Docker has no NVIDIA runtime"),
    ("gpu", HostReport(**GPU, **DOWN), "daemon is not running"),
    ("cpu", HostReport(**DOWN), "daemon is not running"),
    ("cpu", HostReport(), "Docker is not installed"),
])
def test_explicit_mode_that_cannot_run_says_why(mode: str, host: HostReport, words: str) -> None:
    with pytest.raises(LauncherError) as error:
        choose_mode(mode, host)
    assert words in str(error.value) and "--mode embedded" in str(error.value)


def test_unknown_mode() -> None:
    with pytest.raises(LauncherError, match="--mode must be one of"):
        choose_mode("k8s", HostReport())
