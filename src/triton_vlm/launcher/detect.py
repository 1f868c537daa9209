"""Look at the host and pick how to run: Docker with a GPU, Docker on CPU, or the embedded server.

Everything is found through executables on ``PATH`` (``nvidia-smi``, ``docker``, ``docker-compose``), so tests
simulate any host with fake executables. :func:`probe_host` asks them; :func:`choose_mode` decides, and says why
in plain words.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from triton_vlm.launcher.distribution import LauncherError

MODES = ("auto", "gpu", "cpu", "embedded")
#: The docker CLI answers this without a daemon only when the daemon is up; the runtimes tell NVIDIA's apart.
DOCKER_INFO = ["docker", "info", "--format", "{{json .Runtimes}}"]
PROBE_TIMEOUT_S = 20.0

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class HostReport:
    """What this host offers; each ``*_problem`` says in plain words why a thing can't be used (None: fine)."""

    gpus: tuple[str, ...] = ()
    gpu_problem: str | None = "no NVIDIA GPU driver found (nvidia-smi is not installed)"
    docker: str | None = None  # path of the docker CLI
    docker_problem: str | None = "Docker is not installed (no docker command on PATH)"
    nvidia_runtime: bool = False
    compose: tuple[str, ...] = ()  # ("docker", "compose") or ("docker-compose",)
    compose_problem: str | None = None

    @property
    def gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def docker_usable(self) -> bool:
        return self.docker is not None and self.docker_problem is None and bool(self.compose)

    def docker_reason(self) -> str:
        """Why Docker can't be used here (only meaningful when :attr:`docker_usable` is False)."""
        return self.docker_problem or self.compose_problem or "Docker Compose is not available"

    def describe(self) -> list[str]:
        gpu = ", ".join(self.gpus) if self.gpus else f"none ({self.gpu_problem})"
        if self.docker_usable:
            docker = f"{self.docker} with {' '.join(self.compose)}; NVIDIA runtime: " + (
                "yes" if self.nvidia_runtime else "no")
        else:
            docker = f"unusable ({self.docker_reason()})"
        return [f"GPU: {gpu}", f"Docker: {docker}"]


@dataclass(frozen=True)
class Plan:
    mode: str  # gpu | cpu | embedded
    reason: str
    notes: tuple[str, ...] = field(default=())


def _default_runner(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return ""


def probe_gpus(run: Runner = _default_runner,
               which: Callable[[str], str | None] = shutil.which) -> tuple[tuple[str, ...], str | None]:
    """``(gpu names, problem)`` from ``nvidia-smi -L``."""
    if which("nvidia-smi") is None:
        return (), "no NVIDIA GPU driver found (nvidia-smi is not installed)"
    try:
        result = run(["nvidia-smi", "-L"])
    except subprocess.TimeoutExpired:
        return (), f"nvidia-smi did not answer within {PROBE_TIMEOUT_S:.0f} s (is the NVIDIA driver hung?)"
    except OSError as exc:
        return (), f"nvidia-smi could not run ({exc})"
    if result.returncode != 0:
        said = _first_line(result.stdout, result.stderr) or f"exit code {result.returncode}"
        return (), f"the NVIDIA driver is not working: nvidia-smi failed ({said})"
    # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)" -> "NVIDIA H100 80GB HBM3"
    gpus = tuple(line.split(":", 1)[-1].split(" (UUID")[0].strip() for line in result.stdout.splitlines()
                 if line.startswith("GPU "))
    if not gpus:
        return (), "nvidia-smi lists no GPU"
    return gpus, None


def probe_docker(run: Runner = _default_runner, which: Callable[[str], str | None] = shutil.which
                 ) -> tuple[str | None, str | None, bool, tuple[str, ...], str | None]:
    """``(docker path, docker problem, NVIDIA runtime?, compose command, compose problem)``."""
    docker = which("docker")
    if docker is None:
        return None, "Docker is not installed (no docker command on PATH)", False, (), None
    try:
        info = run(DOCKER_INFO)
    except subprocess.TimeoutExpired:
        return docker, f"the Docker daemon did not answer within {PROBE_TIMEOUT_S:.0f} s", False, (), None
    except OSError as exc:
        return docker, f"the docker command could not run ({exc})", False, (), None
    if info.returncode != 0:
        return docker, _docker_info_problem(info.stderr, info.stdout), False, (), None
    try:
        runtimes = json.loads(info.stdout.strip() or "{}")
    except json.JSONDecodeError:
        runtimes = {}
    # The "nvidia" runtime, or the hook dockerd calls for `--gpus` / device requests (nvidia-container-toolkit).
    nvidia = (isinstance(runtimes, dict) and "nvidia" in runtimes) or \
        which("nvidia-container-runtime-hook") is not None
    compose, compose_problem = _probe_compose(run, which)
    return docker, None, nvidia, compose, compose_problem


def _docker_info_problem(stderr: str, stdout: str) -> str:
    # docker 28 prints "null" on stdout and the reason on stderr; older ones mix them.
    said = _first_line(stderr, "\n".join(line for line in stdout.splitlines() if line.strip() != "null"))
    said = said or "no output"
    lowered = (stderr + "\n" + stdout).lower()
    if "permission denied" in lowered:
        return ("Docker is installed but you may not use its daemon (permission denied on the Docker socket): "
                "add yourself to the docker group (`sudo usermod -aG docker $USER`, then log in again) or run "
                f"as root [docker said: {said}]")
    if any(hint in lowered for hint in ("cannot connect", "is the docker daemon running", "connection refused",
                                        "no such file or directory", "failed to connect")):
        return ("Docker is installed but its daemon is not running: start it (`sudo systemctl start docker`, or "
                f"open Docker Desktop) [docker said: {said}]")
    return f"`docker info` failed [docker said: {said}]"


def _probe_compose(run: Runner, which: Callable[[str], str | None]) -> tuple[tuple[str, ...], str | None]:
    try:
        plugin = run(["docker", "compose", "version"])
        if plugin.returncode == 0:
            return ("docker", "compose"), None
    except (subprocess.TimeoutExpired, OSError):
        pass
    if which("docker-compose") is not None:
        return ("docker-compose",), None
    return (), ("Docker Compose is not installed (neither the `docker compose` plugin nor `docker-compose`): "
                "install the docker-compose-plugin package")


def probe_host(run: Runner = _default_runner, which: Callable[[str], str | None] = shutil.which) -> HostReport:
    gpus, gpu_problem = probe_gpus(run, which)
    docker, docker_problem, nvidia, compose, compose_problem = probe_docker(run, which)
    return HostReport(gpus=gpus, gpu_problem=gpu_problem, docker=docker, docker_problem=docker_problem,
                      nvidia_runtime=nvidia, compose=compose, compose_problem=compose_problem)


def choose_mode(requested: str, host: HostReport) -> Plan:
    """The mode to run in. ``auto`` always finds one (the embedded server works everywhere); an explicit mode
    the host can't do raises :class:`LauncherError` saying what is missing."""
    if requested not in MODES:
        raise LauncherError(f"--mode must be one of {', '.join(MODES)}, not {requested!r}")
    if requested == "embedded":
        return Plan("embedded", "--mode embedded: the embedded tritonserver from the Python wheel")
    if requested == "gpu":
        missing = []
        if not host.gpu:
            missing.append(host.gpu_problem or "no GPU")
        if not host.docker_usable:
            missing.append(host.docker_reason())
        elif not host.nvidia_runtime:
            missing.append("Docker has no NVIDIA runtime, so containers can't see the GPU: install the NVIDIA "
                           "Container Toolkit (`nvidia-ctk runtime configure --runtime=docker`, then restart "
                           "Docker)")
        if missing:
            raise LauncherError("--mode gpu needs an NVIDIA GPU and Docker with the NVIDIA runtime, but "
                                + "; ".join(missing) + ". Use --mode embedded (no Docker needed; it uses the GPU "
                                "when there is one) or --mode cpu.")
        return Plan("gpu", f"--mode gpu: Docker with the NVIDIA runtime on {', '.join(host.gpus)}")
    if requested == "cpu":
        if not host.docker_usable:
            raise LauncherError(f"--mode cpu runs the server in Docker, which can't be used here: "
                                f"{host.docker_reason()}. Use --mode embedded to run without Docker.")
        return Plan("cpu", "--mode cpu: Docker, CPU instances")
    # auto
    if host.docker_usable:
        if host.gpu and host.nvidia_runtime:
            return Plan("gpu", f"NVIDIA GPU ({', '.join(host.gpus)}) and Docker with the NVIDIA runtime found")
        if host.gpu:
            return Plan("embedded", f"NVIDIA GPU ({', '.join(host.gpus)}) found, but Docker has no NVIDIA "
                        "runtime, so the embedded server runs instead and uses the GPU directly",
                        ("to run in Docker on the GPU, install the NVIDIA Container Toolkit and restart Docker",))
        return Plan("cpu", "Docker found, no NVIDIA GPU: running in Docker with CPU instances",
                    (f"GPU: {host.gpu_problem}",))
    notes: tuple[str, ...] = ()
    if host.docker is not None:  # installed but unusable: say so, it may be a surprise
        notes = (f"not using Docker: {host.docker_reason()}",)
    gpu = f" on {', '.join(host.gpus)}" if host.gpu else " on the CPU"
    return Plan("embedded", f"{'no Docker' if host.docker is None else 'Docker unusable'}: the embedded "
                f"tritonserver from the Python wheel runs{gpu}", notes)
