"""Run ``tritonserver`` as a child process: build its command and environment, wait for readiness, stop it."""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
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
from typing import IO

from triton_vlm.launcher.distribution import (LauncherError, TritonDistribution, find_distribution, library_path,
                                              prepare_backend_dir)
from triton_vlm.launcher.policies import apply_queue_policy, instance_count, queue_limits
from triton_vlm.launcher.preflight import check_shm
from triton_vlm.launcher.repository import (companions, default_model_repository, make_forwarder, model_family,
                                            render_repository, servable_models)
from triton_vlm.launcher.stub_env import stub_python_bin
from triton_vlm.launcher.supervisor import ADMIN_HEADER, ModelControl, StubSupervisor
from triton_vlm.settings import env_prefix

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
    #: Overload limits for every batched model (None: as in config.pbtxt); see triton_vlm.launcher.policies.
    max_queue_size: int | None = None
    queue_timeout_ms: int | None = None
    #: Reload a model whose Python stub died (Triton itself never does); see triton_vlm.launcher.supervisor.
    supervise: bool = True
    #: Secret for Triton's repository API (load/unload/index), also trace, logging and shared-memory: sent as
    #: the ``triton-vlm-admin-key`` header. None: $TRITON_VLM_ADMIN_KEY, else a random one per run.
    admin_key: str | None = None

    def __post_init__(self) -> None:
        if self.instance_kind not in ("auto", "cpu", "gpu"):
            raise LauncherError(f"instance kind must be auto, cpu or gpu, not {self.instance_kind!r}")
        if self.engine not in ("auto", "on", "off"):
            raise LauncherError(f"engine must be auto, on or off, not {self.engine!r}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3:
            raise LauncherError(f"HTTP, gRPC and metrics ports must differ, got {ports}")


#: Triton APIs only the launcher (or an operator with the admin key) may use: loading or unloading models
#: (running code from the repository), shared-memory registration, trace and log settings (files on the host).
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"


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
        self.admin_key = options.admin_key or os.environ.get("TRITON_VLM_ADMIN_KEY") or secrets.token_urlsafe(24)
        self.supervisor: StubSupervisor | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        opts = self.options
        for name, port in (("HTTP", opts.http_port), ("gRPC", opts.grpc_port), ("metrics", opts.metrics_port)):
            if port_in_use(opts.host, port):
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
        stubs = 0
        for model in self.models:
            apply_queue_policy(served / model, *queue_limits(model, opts.max_queue_size, opts.queue_timeout_ms,
                                                             {**os.environ, **opts.extra_env}))
            stubs += instance_count(served / model)
        check_shm(stubs, env={**os.environ, **opts.extra_env})
        backends = prepare_backend_dir(dist, self.work_dir)
        env = self._environment(dist)
        if opts.tiny:
            self._build_tiny_checkpoints(repository)
        command = [
            str(dist.binary), f"--model-repository={served}", f"--backend-directory={backends}",
            f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}",
            f"--metrics-port={opts.metrics_port}", f"--http-address={opts.host}",
            f"--grpc-address={opts.host}", f"--metrics-address={opts.host}",
            "--allow-metrics=true", "--allow-gpu-metrics=true",
            # EXPLICIT so the supervisor can reload a model whose stub died; every model of the rendered repository
            # loads at start, and loading, unloading (and the other admin APIs) need the admin header.
            "--model-control-mode=explicit", "--load-model=*",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            "--exit-timeout-secs=15", f"--log-verbose={opts.log_verbose}",
        ]
        log.info("starting tritonserver for %s (%s instances%s)", ", ".join(self.models),
                 "CPU" if kind == "KIND_CPU" else "configured", ", tiny weights" if opts.tiny else "")
        self.process = subprocess.Popen(
            command, env=env, cwd=self.work_dir, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        if opts.supervise:
            self.supervisor = StubSupervisor(self.process.pid, self.model_control()).start()
        return self

    def model_control(self) -> ModelControl:
        """Triton's model repository API (index, load, unload) with this run's admin key."""
        return ModelControl(self.http_url, self.admin_key)

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted APIs (gRPC: prefix the key with ``triton-grpc-protocol-``)."""
        return {ADMIN_HEADER: self.admin_key}

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until ``/v2/health/ready`` answers 200; raise with the reason if the server exits first."""
        deadline = time.monotonic() + timeout
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

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server (Triton unloads models and ends its stubs), SIGKILL the group if it hangs."""
        recovered = False
        if self.supervisor is not None:
            self.supervisor.stop()  # before SIGTERM: the unloads at shutdown end every stub on purpose
            recovered, self.supervisor = self.supervisor.recovered, None
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                # Only the server: it ends its stubs itself after unloading the models.
                process.send_signal(signal.SIGTERM)
                try:
                    if recovered and self._wait_for_stubs(process, timeout):
                        code = 0
                    else:
                        process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0fs; killing it", timeout)
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            # Stubs share the server's process group; none may outlive it.
            _signal_group(process.pid, signal.SIGKILL)
            code = process.returncode if code is None else code
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return code

    def _wait_for_stubs(self, process: subprocess.Popen[bytes], timeout: float) -> bool:
        """After SIGTERM on a server that reloaded a model whose stub had died: once every live model is unloaded
        (no live stub left) the server only waits for the dead version, which never unloads. End it then.
        True if it was ended that way."""
        from triton_vlm.launcher.supervisor import live_stubs

        deadline = time.monotonic() + timeout
        quiet_since = None
        while process.poll() is None and time.monotonic() < deadline:
            if live_stubs(process.pid):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                log.info("tritonserver: every model is unloaded; not waiting for the versions whose stub died")
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.1)
        if process.poll() is None:
            raise subprocess.TimeoutExpired("tritonserver", timeout)
        return False

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
        if self.options.tiny:
            env["TRITON_VLM_TINY"] = "1"
        if self.options.preload:
            for model in self.models:
                env[env_prefix(model) + "PRELOAD"] = "1"
        env.update(self.options.extra_env)
        return env

    def _build_tiny_checkpoints(self, repository: Path) -> None:
        from triton_vlm.models import get_family
        from triton_vlm.tiny import ensure_tiny_checkpoint

        for model in self.models:
            family = model_family(repository, model)
            if get_family(family).supported:
                ensure_tiny_checkpoint(family)


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
