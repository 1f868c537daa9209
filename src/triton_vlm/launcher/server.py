"""Run ``tritonserver`` as a child process: build its command and environment, wait for readiness, stop it.

:meth:`TritonServer.start` reads as its steps, each a method below it. The server process, and whether it is
started again when it dies, belong to :class:`~triton_vlm.launcher.restarts.ServerRestarts`; its stubs to
:class:`~triton_vlm.launcher.supervisor.StubSupervisor`.
"""

from __future__ import annotations

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from triton_vlm.config import env_prefix
from triton_vlm.launcher.checkpoint import CheckpointRequest, resolve_checkpoint, write_entry
from triton_vlm.launcher.children import die_with_parent, signal_group
from triton_vlm.launcher.control import ADMIN_HEADER, ModelControl
from triton_vlm.launcher.distribution import (
    LauncherError,
    TritonDistribution,
    find_distribution,
    library_path,
    prepare_backend_dir,
)
from triton_vlm.launcher.policies import (
    apply_batch_delay,
    apply_queue_policy,
    instance_count,
    own_batch_delay,
    queue_limits,
)
from triton_vlm.launcher.preflight import check_shm
from triton_vlm.launcher.procfs import dump_stub_stacks, live_stubs
from triton_vlm.launcher.repository import (
    companions,
    default_model_repository,
    make_forwarder,
    model_family,
    model_settings,
    render_repository,
    servable_models,
)
from triton_vlm.launcher.restarts import ServerRestarts
from triton_vlm.launcher.stub_env import stub_python_bin
from triton_vlm.launcher.supervisor import StubSupervisor
from triton_vlm.launcher.watchdog import hang_timeout
from triton_vlm.openai import OpenAIOptions

if TYPE_CHECKING:
    # Imported where the front starts: openai.process imports launcher.children, and importing that package first
    # (launcher/__init__ -> this module) would otherwise meet a half-initialized openai.process.
    from triton_vlm.openai.process import OpenAIFront

log = logging.getLogger("triton_vlm")


@dataclass(frozen=True)
class ServerOptions:
    """What one server run serves and where; the defaults are Triton's usual ports on loopback."""

    models: tuple[str, ...] = ()  # empty: every model this version can serve
    model_repository: Path | None = None
    #: Serve this one checkpoint (hub id or directory) instead of a repository's models: its entry is written into
    #: a repository of this run's own (triton_vlm.launcher.checkpoint), so ``models`` and ``model_repository``
    #: must stay unset.
    checkpoint: CheckpointRequest | None = None
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
        if self.checkpoint is not None and (self.models or self.model_repository is not None):
            raise LauncherError(f"serve either the checkpoint {self.checkpoint.source} or models of a repository "
                                "(--models, $TRITON_VLM_MODELS, --model-repository), not both")


#: Triton APIs only the launcher (or an operator with the admin key) may use: loading or unloading models
#: (running code from the repository), shared-memory registration, trace and log settings (files on the host).
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
#: Triton's own wait for models to unload at shutdown (it exits 1 past it).
EXIT_TIMEOUT_S = 30
#: How long after SIGTERM a server that has not exited yet has its stubs print their stacks (within EXIT_TIMEOUT_S).
STACKS_AFTER_S = 22.0


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
    """Whether ``port`` on ``host`` cannot be bound now (something listens there)."""
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
    (Linux), so no server outlives its launcher. When it dies on its own after it was ready, it is started again
    (see :mod:`triton_vlm.launcher.restarts`).
    """

    def __init__(self, options: ServerOptions, log_file: IO[str] | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self._own_work_dir = options.work_dir is None
        self.work_dir = options.work_dir or Path(tempfile.mkdtemp(prefix="triton-vlm-"))
        self.models: list[str] = []
        #: The repository the served one is rendered from (set by :meth:`start`).
        self.repository: Path | None = None
        self.admin_key = options.admin_key or os.environ.get("TRITON_VLM_ADMIN_KEY") or secrets.token_urlsafe(24)
        self.supervisor: StubSupervisor | None = None
        self.openai_front: OpenAIFront | None = None
        #: Engine model -> the public models that forward to it (engine hosts); reloaded with it by the supervisor.
        self._forwarders: dict[str, list[str]] = {}
        self._command: list[str] = []
        self._env: dict[str, str] = {}
        self._restarts: ServerRestarts[subprocess.Popen[bytes]] = ServerRestarts(
            self._spawn, self._ports_free, cleanup=self._clean_up_after)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running tritonserver (a new one after each restart); None before start and after stop."""
        return self._restarts.process

    @process.setter
    def process(self, process: subprocess.Popen[bytes] | None) -> None:
        self._restarts.adopt(process)

    @property
    def server_restarts(self) -> list[float]:
        """When (time.monotonic) tritonserver was started again after it died, oldest first."""
        return self._restarts.restarts

    # -- start: the steps ---------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        """Start tritonserver (and the OpenAI front, if asked for). A step that fails before the spawn raises
        :class:`LauncherError` saying what to do, and no process has started then."""
        opts = self.options
        self._check_ports_free()
        dist = find_distribution()
        repository = self.repository = self._source_repository()
        streams = self._select_models(repository)
        kind = self._instance_kind()
        served = render_repository(repository, self.work_dir / "models", self.models, kind)
        self._add_forwarders(served, streams, kind)
        settings_env = {**os.environ, **opts.extra_env}  # what the models' own TRITON_VLM_<MODEL>_* come from
        check_shm(self._apply_overload_limits(served, settings_env), env=settings_env)
        backends = prepare_backend_dir(dist, self.work_dir)
        env = self._environment(dist)
        if opts.tiny:
            self._build_tiny_checkpoints(repository)
        process = self._spawn_first(self._command_line(dist.binary, served, backends), env, kind)
        if opts.supervise:
            self._start_supervisor(process.pid, settings_env)
        if opts.openai is not None:
            self._start_openai_front(opts.openai)
        return self

    def _check_ports_free(self) -> None:
        """Refuse to start where a port this run would listen on is taken (another tritonserver?)."""
        opts = self.options
        busy = [("HTTP", opts.host, opts.http_port), ("gRPC", opts.host, opts.grpc_port),
                ("metrics", opts.host, opts.metrics_port)]
        if opts.openai is not None:
            busy.append(("OpenAI", opts.openai.host, opts.openai.port))
        for name, host, port in busy:
            if port_in_use(host, port):
                raise LauncherError(f"{name} port {port} is already in use (another tritonserver?); "
                                    f"stop it or choose another port with --{name.lower()}-port")

    def _source_repository(self) -> Path:
        """The repository to serve: the one named (or found), or for a checkpoint a repository of this run's own
        holding its one entry (the public model; :meth:`_select_models` adds its ``_stream``)."""
        opts = self.options
        if opts.checkpoint is None:
            return opts.model_repository or default_model_repository()
        checkpoint = resolve_checkpoint(opts.checkpoint)
        log.info("serving %s", checkpoint.describe())
        repository = self.work_dir / "checkpoint"
        write_entry(repository, checkpoint)
        return repository

    def _select_models(self, repository: Path) -> dict[str, list[str]]:
        """Set :attr:`models`: the public models asked for (default: every one ``repository`` can serve), then
        their ``<model>_stream`` companions. Returns each public model's companions."""
        public = list(self.options.models) or servable_models(repository)
        if not public:
            raise LauncherError(f"no servable models in {repository}")
        streams = {m: companions(repository, m) for m in public}
        self.models = public + [c for m in public for c in streams[m] if c not in public]
        return streams

    def _add_forwarders(self, served: Path, streams: dict[str, list[str]], kind: str | None) -> None:
        """Where the engine serves (``engine`` on, or auto and not on CPU), make each public model that has a
        companion forward to it, over gRPC to this server."""
        opts = self.options
        self._forwarders = {}
        if opts.engine == "on" or (opts.engine == "auto" and kind != "KIND_CPU"):
            for model, companion in streams.items():
                if companion:
                    make_forwarder(served / model, companion[0], opts.forwarder_instances, self.grpc_url)
                    self._forwarders.setdefault(companion[0], []).append(model)

    def _apply_overload_limits(self, served: Path, settings_env: Mapping[str, str]) -> int:
        """Write each rendered model's queue policy and batching delay (see :mod:`triton_vlm.launcher.policies`);
        returns how many model instances (Python stubs) will run, which the /dev/shm check needs."""
        opts = self.options
        stubs = 0
        for model in self.models:
            apply_queue_policy(served / model, *queue_limits(model, opts.max_queue_size, opts.queue_timeout_ms,
                                                             settings_env))
            apply_batch_delay(served / model, opts.batch_delay_us, own_batch_delay(model, settings_env))
            stubs += instance_count(served / model)
        return stubs

    def _command_line(self, binary: Path, served: Path, backends: Path) -> list[str]:
        """tritonserver's command line: the rendered repository, this run's addresses, explicit model control
        behind the admin key."""
        opts = self.options
        return [
            str(binary), f"--model-repository={served}", f"--backend-directory={backends}",
            f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}",
            f"--metrics-port={opts.metrics_port}", f"--http-address={opts.host}",
            f"--grpc-address={opts.host}", f"--metrics-address={opts.host}",
            "--allow-metrics=true", "--allow-gpu-metrics=true",
            # EXPLICIT so the supervisor can reload a model whose stub died; every model of the rendered repository
            # loads at start, and loading, unloading (and the other admin APIs) need the admin header.
            "--model-control-mode=explicit", "--load-model=*",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}", f"--log-verbose={opts.log_verbose}",
        ]

    def _spawn_first(self, command: list[str], env: dict[str, str], kind: str | None) -> subprocess.Popen[bytes]:
        """Start the first tritonserver; a restart spawns the same command in the same environment."""
        log.info("starting tritonserver for %s (%s instances%s)", ", ".join(self.models),
                 "CPU" if kind == "KIND_CPU" else "configured", ", tiny weights" if self.options.tiny else "")
        self._command, self._env = command, env
        return self._restarts.start()

    def _start_supervisor(self, server_pid: int, settings_env: Mapping[str, str]) -> None:
        """Watch the stubs (reload a model whose stub died) and the server (start it again when it dies, kill it
        when it hangs)."""
        self.supervisor = StubSupervisor(server_pid, self.model_control(),
                                         on_server_exit=self._restarts.server_exited, dependents=self._forwarders,
                                         hang_timeout=hang_timeout(settings_env),
                                         server_log=self._log_path()).start()
        self._restarts.supervised()

    def _start_openai_front(self, options: OpenAIOptions) -> None:
        """Start the OpenAI-compatible front as a child process of its own (stopped with the server)."""
        from triton_vlm.openai.process import OpenAIFront

        self.openai_front = OpenAIFront(options, log_file=self.log_file).start()

    # -- the server process -------------------------------------------------------------------------------
    def _log_path(self) -> Path | None:
        """The server's log file where it is a regular file (the watchdog reads its crash lines)."""
        name = getattr(self.log_file, "name", None)
        return Path(name) if isinstance(name, str) and os.path.isfile(name) else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command, env=self._env, cwd=self.work_dir, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )

    def _ports_free(self) -> bool:
        """Whether a new tritonserver can listen on this run's ports (a dead one's may linger a moment)."""
        opts = self.options
        return not any(port_in_use(opts.host, port) for port in (opts.http_port, opts.grpc_port, opts.metrics_port))

    def _clean_up_after(self, process: subprocess.Popen[bytes]) -> None:
        """What a dead tritonserver leaves: stubs that outlived it, their shared-memory regions."""
        signal_group(process.pid, signal.SIGKILL)
        supervisor = self.supervisor
        if supervisor is not None:
            _remove_regions(supervisor.regions)

    def wait(self, poll_s: float = 0.5) -> int:
        """Block while the server runs (across restarts after a crash); its exit code once it stays down, or 1
        when the OpenAI front dies (a server whose advertised API died should not go on half-working)."""
        last: subprocess.Popen[bytes] | None = None
        while True:
            # A stop() from another thread releases the process before it has exited: follow it to its exit code
            # rather than answer 0 for a server that is still going down.
            process = self.process or last
            if process is None:
                return 0
            last = process
            try:
                code = process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                front = self.openai_front
                if front is not None and front.process is not None and front.process.poll() is not None:
                    log.error("the OpenAI front exited (code %s); stopping", front.process.returncode)
                    return 1
                continue
            if self.process is None or self._restarts.stays_down(process):
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
                self._restarts.ready()
                return
            time.sleep(0.25)
        raise LauncherError(f"tritonserver was not ready after {timeout:.0f}s ({url})")

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM the server (Triton unloads models and ends its stubs), SIGKILL the group if it hangs."""
        front, self.openai_front = self.openai_front, None
        if front is not None:
            front.stop()
        self._restarts.stopping()
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()  # first: the unloads at shutdown end every stub on purpose
        process = self._restarts.release()
        code = None
        if process is not None:
            if process.poll() is None:
                try:
                    if supervisor is not None and supervisor.recovered:
                        code = self._stop_after_recovery(process, supervisor, timeout)
                    else:
                        # Only the server: it ends its stubs itself after unloading the models.
                        process.send_signal(signal.SIGTERM)
                        self._wait_stopping(process, timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0fs; killing it", timeout)
                    signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            # Stubs share the server's process group; none may outlive it.
            signal_group(process.pid, signal.SIGKILL)
            code = process.returncode if code is None else code
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return code

    @staticmethod
    def _wait_stopping(process: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for a SIGTERMed server to exit (``subprocess.TimeoutExpired`` past ``timeout``). One still running
        near its exit timeout has a model that does not unload: its stubs print their threads' stacks into the log
        first, which tells a stub stuck in ``finalize`` from a model Triton never finalized."""
        try:
            process.wait(timeout=min(timeout, STACKS_AFTER_S))
            return
        except subprocess.TimeoutExpired:
            if timeout <= STACKS_AFTER_S:
                raise
        stubs = dump_stub_stacks(process.pid)
        log.warning("tritonserver has not stopped %.0fs after SIGTERM; stacks of its live stubs (%s) are in its log",
                    STACKS_AFTER_S, ", ".join(stub.instance for stub in stubs) or "none")
        process.wait(timeout=timeout - STACKS_AFTER_S)

    def _stop_after_recovery(self, process: subprocess.Popen[bytes], supervisor: StubSupervisor,
                             timeout: float) -> int:
        """Stop a server that reloaded a model after its stub died. The dead version never unloads (requests
        that were in flight on it are never released), so tritonserver's own shutdown would wait out its exit
        timeout and exit 1. Instead: unload every model (in-flight requests on live stubs finish first), wait
        until no live stub is left, end the server, remove the dead stubs' shared-memory regions. Returns 0."""
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
        signal_group(process.pid, signal.SIGKILL)
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
