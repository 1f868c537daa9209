"""Run ``tritonserver`` as a child process: build its command and environment, wait for readiness, stop it."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from triton_vlm.launcher.distribution import (LauncherError, TritonDistribution, find_distribution, library_path,
                                              prepare_backend_dir)
from triton_vlm.launcher.repository import (base_model, companions, default_model_repository, make_forwarder,
                                            model_family, render_repository, servable_models)
from triton_vlm.launcher.stub_env import stub_python_bin
from triton_vlm.settings import env_prefix

if TYPE_CHECKING:
    from triton_vlm.openai import OpenAIOptions
    from triton_vlm.openai.process import OpenAIFront

log = logging.getLogger("triton_vlm")


@dataclass(frozen=True)
class ServerOptions:
    """What one server run serves and where; the defaults are Triton's usual ports on loopback."""

    models: tuple[str, ...] = ()  # empty: every model this version can serve
    model_repository: Path | None = None
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    tiny: bool = False
    preload: bool = False
    instance_kind: str = "auto"  # auto | cpu | gpu
    #: auto: on GPU hosts public models forward to their ``<m>_stream`` engine model; on: always; off: never.
    engine: str = "auto"
    forwarder_instances: int = 8
    work_dir: Path | None = None
    log_verbose: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Also run the OpenAI-compatible front (its own process, stopped with the server); None: don't.
    openai: OpenAIOptions | None = None

    def __post_init__(self) -> None:
        if self.instance_kind not in ("auto", "cpu", "gpu"):
            raise LauncherError(f"instance kind must be auto, cpu or gpu, not {self.instance_kind!r}")
        if self.engine not in ("auto", "on", "off"):
            raise LauncherError(f"engine must be auto, on or off, not {self.engine!r}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3:
            raise LauncherError(f"HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.openai is not None and self.openai.port in ports:
            raise LauncherError(f"the OpenAI port {self.openai.port} is already the HTTP, gRPC or metrics port")


def gpu_available() -> bool:
    """True where ``nvidia-smi -L`` lists a GPU (cheaper than importing torch in the launcher)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1" if host in ("0.0.0.0", "localhost") else host, port))
        except OSError:
            return True
    return False


class TritonServer:
    """One ``tritonserver`` child process over a rendered copy of the model repository.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. The child gets SIGTERM if this process dies
    (Linux), so no server outlives its launcher.
    """

    def __init__(self, options: ServerOptions, log_file: IO[str] | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self._own_work_dir = options.work_dir is None
        self.work_dir = options.work_dir or Path(tempfile.mkdtemp(prefix="triton-vlm-"))
        self.models: list[str] = []
        self.openai_front: OpenAIFront | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        opts = self.options
        busy = [("HTTP", opts.http_port), ("gRPC", opts.grpc_port), ("metrics", opts.metrics_port)]
        if opts.openai is not None:
            busy.append(("OpenAI", opts.openai.port))
        for name, port in busy:
            if port_in_use(opts.host if name != "OpenAI" else opts.openai.host, port):  # type: ignore[union-attr]
                raise LauncherError(f"{name} port {port} is already in use (another tritonserver?); "
                                    f"stop it or choose another port with --{name.lower()}-port")
        dist = find_distribution()
        repository = opts.model_repository or default_model_repository()
        public = list(opts.models) or servable_models(repository)
        if not public:
            raise LauncherError(f"no servable models in {repository}")
        streams = {m: companions(repository, m) for m in public}
        self.models = public + [c for m in public for c in streams[m] if c not in public]
        kind = self._instance_kind()
        served = render_repository(repository, self.work_dir / "models", self.models, kind)
        if opts.engine == "on" or (opts.engine == "auto" and kind != "KIND_CPU"):
            for model in public:
                if streams[model]:
                    make_forwarder(served / model, streams[model][0], opts.forwarder_instances)
        backends = prepare_backend_dir(dist, self.work_dir)
        env = self._environment(dist)
        if opts.tiny:
            self._build_tiny_checkpoints(repository)
        command = [
            str(dist.binary), f"--model-repository={served}", f"--backend-directory={backends}",
            f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}",
            f"--metrics-port={opts.metrics_port}", f"--http-address={opts.host}",
            f"--grpc-address={opts.host}", f"--metrics-address={opts.host}",
            "--allow-metrics=true", "--allow-gpu-metrics=true", "--model-control-mode=none",
            "--exit-timeout-secs=30", f"--log-verbose={opts.log_verbose}",
        ]
        log.info("starting tritonserver for %s (%s instances%s)", ", ".join(self.models),
                 "CPU" if kind == "KIND_CPU" else "configured", ", tiny weights" if opts.tiny else "")
        self.process = subprocess.Popen(
            command, env=env, cwd=self.work_dir, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        if opts.openai is not None:
            from triton_vlm.openai.process import OpenAIFront

            self.openai_front = OpenAIFront(opts.openai, log_file=self.log_file).start()
        return self

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until ``/v2/health/ready`` answers 200 (and the OpenAI front's ``/health``, if it runs); raise
        with the reason if the server exits first."""
        deadline = time.monotonic() + timeout
        if self.openai_front is not None:
            self.openai_front.wait_until_ready(timeout)
        url = f"http://{self._client_host()}:{self.options.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise LauncherError(f"tritonserver exited (code {code}) before it was ready; see its log above")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise LauncherError(f"tritonserver was not ready after {timeout:.0f}s ({url})")

    def wait(self, poll_s: float = 0.5) -> int:
        """Until tritonserver exits (its exit code), or the OpenAI front does (1: a server whose advertised API
        died should not go on half-working; the caller stops the rest)."""
        assert self.process is not None, "start() first"
        while True:
            try:
                return self.process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                pass
            front = self.openai_front
            if front is not None and front.process is not None and front.process.poll() is not None:
                log.error("the OpenAI front exited (code %s); stopping", front.process.returncode)
                return 1

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM the server (Triton unloads models and ends its stubs), SIGKILL the group if it hangs."""
        front, self.openai_front = self.openai_front, None
        if front is not None:
            front.stop()
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                # Only the server: it ends its stubs itself after unloading the models.
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0fs; killing it", timeout)
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            # Stubs share the server's process group; none may outlive it.
            _signal_group(process.pid, signal.SIGKILL)
            code = process.returncode
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------------------------
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host()}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host()}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host()}:{self.options.metrics_port}/metrics"

    # -- helpers ------------------------------------------------------------------------------------------
    def _instance_kind(self) -> str | None:
        kind = self.options.instance_kind
        if kind == "cpu" or (kind == "auto" and not gpu_available()):
            return "KIND_CPU"
        if kind == "gpu":
            return "KIND_GPU"
        return None  # as configured

    def _environment(self, dist: TritonDistribution) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = stub_python_bin(self.work_dir)
        env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = library_path(dist)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for secret in ("TRITON_VLM_API_KEY", "TRITON_VLM_API_KEY_FILE"):  # the OpenAI front's, not Triton's
            env.pop(secret, None)
        if self.options.tiny:
            env["TRITON_VLM_TINY"] = "1"
        if self.options.preload:
            for model in self.models:
                env[env_prefix(model) + "PRELOAD"] = "1"
        env.update(self.options.extra_env)
        return env

    def _build_tiny_checkpoints(self, repository: Path) -> None:
        from triton_vlm.models import get_family
        from triton_vlm.settings import ModelSettings, read_config_parameters
        from triton_vlm.tiny import ensure_tiny_checkpoint

        for model in self.models:
            family = get_family(model_family(repository, model))
            if family.supported:
                source = base_model(repository, model) or model
                name, parameters = read_config_parameters(repository / source / "config.pbtxt")
                parameters.setdefault("model_family", family.name)
                hf_model_id = ModelSettings.from_parameters(name, parameters).hf_model_id
                ensure_tiny_checkpoint(family.name,
                                       variant=family.tiny_variant(hf_model_id or family.default_hf_model_id))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us when the launcher dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
        except OSError:
            pass
