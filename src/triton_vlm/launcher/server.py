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
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from triton_vlm.config import env_prefix
from triton_vlm.launcher.distribution import (LauncherError, TritonDistribution, find_distribution, library_path,
                                              prepare_backend_dir)
from triton_vlm.launcher.policies import (apply_batch_delay, apply_queue_policy, instance_count, own_batch_delay,
                                          queue_limits)
from triton_vlm.launcher.preflight import check_shm
from triton_vlm.launcher.repository import (companions, default_model_repository, make_forwarder, model_family,
                                            model_settings, render_repository, servable_models)
from triton_vlm.launcher.stub_env import stub_python_bin
from triton_vlm.launcher.supervisor import ADMIN_HEADER, ModelControl, StubSupervisor, hang_timeout

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
    #: Overload limits for every batched model (None: as in config.pbtxt); see triton_vlm.launcher.policies.
    max_queue_size: int | None = None
    queue_timeout_ms: int | None = None
    #: How long a batch may wait for more requests, µs (None: config.pbtxt's, 0: run at once).
    batch_delay_us: int | None = None
    #: Reload a model whose Python stub died (Triton itself never does); see triton_vlm.launcher.supervisor.
    supervise: bool = True
    #: Secret for Triton's repository API (load/unload/index), also trace, logging and shared-memory: sent as
    #: the ``triton-vlm-admin-key`` header. None: $TRITON_VLM_ADMIN_KEY, else a random one per run.
    admin_key: str | None = None
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


#: Triton APIs only the launcher (or an operator with the admin key) may use: loading or unloading models
#: (running code from the repository), shared-memory registration, trace and log settings (files on the host).
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
#: A server that crashes more often than this is left down (an orchestrator may do better than a loop).
MAX_SERVER_RESTARTS = 5
RESTART_WINDOW_S = 600.0


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


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s (a health or metrics endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
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
        #: Times tritonserver itself died and was started again (see :meth:`_server_exited`).
        self.server_restarts: list[float] = []
        self._command: list[str] = []
        self._env: dict[str, str] = {}
        self._ready_once = False
        self._stopping = False
        self._gave_up = False
        self._lifecycle = threading.Condition()
        self.openai_front: OpenAIFront | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        opts = self.options
        busy = [("HTTP", opts.host, opts.http_port), ("gRPC", opts.host, opts.grpc_port),
                ("metrics", opts.host, opts.metrics_port)]
        if opts.openai is not None:
            busy.append(("OpenAI", opts.openai.host, opts.openai.port))
        for name, host, port in busy:
            if port_in_use(host, port):
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
        self._forwarders: dict[str, list[str]] = {}
        if opts.engine == "on" or (opts.engine == "auto" and kind != "KIND_CPU"):
            for model in public:
                if streams[model]:
                    make_forwarder(served / model, streams[model][0], opts.forwarder_instances, self.grpc_url)
                    self._forwarders.setdefault(streams[model][0], []).append(model)
        stubs = 0
        settings_env = {**os.environ, **opts.extra_env}  # what the models' own TRITON_VLM_<MODEL>_* come from
        for model in self.models:
            apply_queue_policy(served / model, *queue_limits(model, opts.max_queue_size, opts.queue_timeout_ms,
                                                             settings_env))
            apply_batch_delay(served / model, opts.batch_delay_us, own_batch_delay(model, settings_env))
            stubs += instance_count(served / model)
        check_shm(stubs, env=settings_env)
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
            "--exit-timeout-secs=30", f"--log-verbose={opts.log_verbose}",
        ]
        log.info("starting tritonserver for %s (%s instances%s)", ", ".join(self.models),
                 "CPU" if kind == "KIND_CPU" else "configured", ", tiny weights" if opts.tiny else "")
        self._command, self._env = command, env
        self._stopping = False
        self.process = self._spawn()
        if opts.supervise:
            self.supervisor = StubSupervisor(self.process.pid, self.model_control(),
                                             on_server_exit=self._server_exited, dependents=self._forwarders,
                                             hang_timeout=hang_timeout(settings_env),
                                             server_log=self._log_path()).start()
        if opts.openai is not None:
            from triton_vlm.openai.process import OpenAIFront

            self.openai_front = OpenAIFront(opts.openai, log_file=self.log_file).start()
        return self

    def _log_path(self) -> Path | None:
        """The server's log file where it is a regular file (the watchdog reads its crash lines)."""
        name = getattr(self.log_file, "name", None)
        return Path(name) if isinstance(name, str) and os.path.isfile(name) else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command, env=self._env, cwd=self.work_dir, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )

    def _server_exited(self) -> int | None:
        """Called by the supervisor when tritonserver itself died (the Python backend aborts the whole server in
        some stub crashes, e.g. a decoupled stub killed while it streams): start it again on the same ports,
        at most :data:`MAX_SERVER_RESTARTS` times in :data:`RESTART_WINDOW_S`. Returns the new pid, or None
        (stopping, never ready yet, or too many restarts: then it stays down and :meth:`wait` returns)."""
        with self._lifecycle:
            process = self.process
            if self._stopping or process is None or not self._ready_once:
                return None
            code = process.poll()
            if code is None:
                return process.pid
            _signal_group(process.pid, signal.SIGKILL)  # its stubs, if any outlived it
            if self.supervisor is not None:
                _remove_regions(self.supervisor.regions)
            now = time.monotonic()
            recent = [t for t in self.server_restarts if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_SERVER_RESTARTS:
                log.error("tritonserver exited (code %s) for the %d. time in %.0fs; not restarting it again",
                          code, len(recent) + 1, RESTART_WINDOW_S)
                self._gave_up = True
                self._lifecycle.notify_all()
                return None
            log.error("tritonserver exited unexpectedly (code %s); starting it again on the same ports", code)
            opts = self.options
            deadline = now + 30
            while time.monotonic() < deadline and any(
                    port_in_use(opts.host, port) for port in (opts.http_port, opts.grpc_port, opts.metrics_port)):
                time.sleep(0.2)
            self.process = self._spawn()
            self.server_restarts.append(time.monotonic())
            self._lifecycle.notify_all()
            return self.process.pid

    def wait(self, poll_s: float = 0.5) -> int:
        """Block while the server runs (across restarts after a crash); its exit code once it stays down, or 1
        when the OpenAI front dies (a server whose advertised API died should not go on half-working)."""
        while True:
            with self._lifecycle:
                process = self.process
            if process is None:
                return 0
            try:
                code = process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                front = self.openai_front
                if front is not None and front.process is not None and front.process.poll() is not None:
                    log.error("the OpenAI front exited (code %s); stopping", front.process.returncode)
                    return 1
                continue
            with self._lifecycle:
                # The supervisor looks every fraction of a second: give it time to start a new server.
                self._lifecycle.wait_for(lambda: self.process is not process or self._gave_up or self._stopping
                                         or self.supervisor is None or not self._ready_once, timeout=10)
                if self.process is process or self._gave_up or self._stopping:
                    return code

    def model_control(self) -> ModelControl:
        """Triton's model repository API (index, load, unload) with this run's admin key."""
        return ModelControl(self.http_url, self.admin_key)

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted APIs (gRPC: prefix the key with ``triton-grpc-protocol-``)."""
        return {ADMIN_HEADER: self.admin_key}

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until ``/v2/health/ready`` and the metrics endpoint answer 200 (and the OpenAI front's
        ``/health``, if it runs); raise with the reason if the server exits first. Triton starts its metrics
        service just after HTTP says ready: a scrape in between was refused."""
        deadline = time.monotonic() + timeout
        if self.openai_front is not None:
            self.openai_front.wait_until_ready(timeout)
        url = f"http://{self._client_host()}:{self.options.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise LauncherError(f"tritonserver exited (code {code}) before it was ready; see its log above")
            if answers(url) and answers(self.metrics_url):
                self._ready_once = True
                return
            time.sleep(0.25)
        raise LauncherError(f"tritonserver was not ready after {timeout:.0f}s ({url})")

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM the server (Triton unloads models and ends its stubs), SIGKILL the group if it hangs."""
        front, self.openai_front = self.openai_front, None
        if front is not None:
            front.stop()
        with self._lifecycle:
            self._stopping = True
            self._lifecycle.notify_all()
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()  # first: the unloads at shutdown end every stub on purpose
        with self._lifecycle:
            process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                try:
                    if supervisor is not None and supervisor.recovered:
                        code = self._stop_after_recovery(process, supervisor, timeout)
                    else:
                        # Only the server: it ends its stubs itself after unloading the models.
                        process.send_signal(signal.SIGTERM)
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

    def _stop_after_recovery(self, process: subprocess.Popen[bytes], supervisor: StubSupervisor,
                             timeout: float) -> int:
        """Stop a server that reloaded a model after its stub died. The dead version never unloads (requests
        that were in flight on it are never released), so tritonserver's own shutdown would wait out its exit
        timeout and exit 1. Instead: unload every model (in-flight requests on live stubs finish first), wait
        until no live stub is left, end the server, remove the dead stubs' shared-memory regions. Returns 0."""
        from triton_vlm.launcher.supervisor import live_stubs

        control = self.model_control()
        for model in self.models:
            try:
                control.unload(model)
            except Exception as exc:  # the server is going away regardless
                log.debug("unloading %s before stop: %s", model, exc)
        deadline = time.monotonic() + timeout
        while process.poll() is None and live_stubs(process.pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("tritonserver", timeout)
            time.sleep(0.1)
        log.info("tritonserver: every live model is unloaded; ending it without waiting for the versions whose "
                 "stub died")
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        _remove_regions(supervisor.regions)
        return 0

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
        from triton_vlm.tiny import ensure_tiny_checkpoint

        for model in self.models:
            family = get_family(model_family(repository, model))
            if family.supported:
                hf_model_id = model_settings(repository, model).weights.hf_model_id
                ensure_tiny_checkpoint(family.name,
                                       variant=family.tiny_variant(hf_model_id or family.default_hf_model_id))


def _remove_regions(regions: set[str]) -> None:
    """Remove stubs' shared-memory regions that a killed or crashed server left in /dev/shm."""
    for region in regions:
        try:
            os.unlink(os.path.join("/dev/shm", region))
        except OSError:
            pass


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
