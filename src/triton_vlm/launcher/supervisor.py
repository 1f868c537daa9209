"""Keep models serving when a Python backend stub dies, and keep readiness truthful while they recover.

Triton 2.51 never restarts a stub that died (SIGKILL, the OOM killer, a segfault in a native library): every
later request to that model fails with "Stub process '<instance>' is not healthy", while ``/v2/health/ready``
and the model's ready endpoint go on answering 200 (server issues #7230, #8604). :class:`StubSupervisor`, a
thread of the launcher, watches the stubs (children of ``tritonserver``, found through ``/proc``) and when one
dies, reloads its model through Triton's model repository API: unload (readiness now answers 400 for the model
and the server), then load (fresh stubs, READY again). Requests in flight on the dead stub get errors; later
ones are served again.

The dead version never finishes unloading (the Python backend does not release the requests that were in
flight on the dead stub), so at shutdown tritonserver would wait its whole exit timeout for it and exit 1;
:meth:`TritonServer.stop` unloads the live models itself and ends the server once their stubs are gone (see
:attr:`recovered`), then removes the dead stubs' shared-memory regions.

Streams in flight on a dead decoupled model (``<model>_stream``) get no final response from Triton 2.51: they
end at their client's timeout. Non-streaming requests in flight get an error within about a second.

The repository API is only reachable with the launcher's admin header (``--http-restricted-api`` /
``--grpc-restricted-protocol``), so nobody else can load or unload models (see :class:`ModelControl`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from triton_vlm.launcher.distribution import LauncherError

log = logging.getLogger("triton_vlm")

#: The header the repository API (model load/unload, index) requires; gRPC metadata key
#: ``triton-grpc-protocol-<this>``.
ADMIN_HEADER = "triton-vlm-admin-key"
STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """One live Python backend stub: its process, model and instance (e.g. ``llava_0_0``)."""

    pid: int
    model: str
    instance: str
    #: Its shared-memory region in /dev/shm (``triton_python_backend_shm_region_<uuid>``).
    region: str = ""


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z`` for a zombie...), None if it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # "pid (comm) state ...": comm may hold spaces and parentheses; the state follows the last ')'.
    return stat[stat.rfind(b")") + 2:][:1].decode() or None


def _parent(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, zombies included (whichever of its threads started them)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    lists = [_read(f"/proc/{pid}/task/{task}/children") for task in tasks]
    if all(children is not None for children in lists):
        return sorted({int(c) for children in lists for c in (children or b"").split()})
    found = []
    for entry in os.listdir("/proc"):  # kernels without CONFIG_PROC_CHILDREN
        if entry.isdigit() and _parent(int(entry)) == pid:
            found.append(int(entry))
    return found


def live_stubs(server_pid: int) -> dict[int, Stub]:
    """The server's live stubs by pid. A stub's command line is
    ``triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> ... <instance> <kind>``."""
    stubs = {}
    for pid in child_pids(server_pid):
        if process_state(pid) in (None, "Z", "X"):
            continue
        argv = (_read(f"/proc/{pid}/cmdline") or b"").decode(errors="replace").split("\0")
        if len(argv) < 4 or not argv[0].endswith(STUB_NAME):
            continue
        model_file = Path(argv[1])
        args = [a for a in argv if a]
        stubs[pid] = Stub(pid, model_file.parent.parent.name, args[-2] if len(args) >= 2 else "", argv[2])
    return stubs


def exit_reason(pid: int) -> str:
    """How a (zombie) child ended, as far as /proc tells: its exit signal or code."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return "exited"
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        status = int(fields[49])  # exit_code (field 52 of stat, Linux >= 3.5)
    except (IndexError, ValueError):
        return "exited"
    if status & 0x7F:
        try:
            return f"killed by {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"killed by signal {status & 0x7F}"
    return f"exited with code {status >> 8}"


#: Seconds a server that answered before may go without answering ``/v2/health/live`` before it is killed.
DEFAULT_HANG_TIMEOUT_S = 30.0


def hang_timeout(env: Mapping[str, str]) -> float:
    """The watchdog's limit: ``TRITON_VLM_HANG_TIMEOUT_S`` (0 turns it off), else :data:`DEFAULT_HANG_TIMEOUT_S`."""
    raw = env.get("TRITON_VLM_HANG_TIMEOUT_S", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HANG_TIMEOUT_S
    except ValueError:
        raise LauncherError(f"TRITON_VLM_HANG_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise LauncherError(f"TRITON_VLM_HANG_TIMEOUT_S must be >= 0, got {value}")
    return value


class ModelControl:
    """Triton's model repository API over HTTP, with the launcher's admin header."""

    def __init__(self, http_url: str, admin_key: str, timeout: float = 300.0) -> None:
        self.http_url = http_url
        self.base = f"http://{http_url}/v2/repository"
        self.headers = {ADMIN_HEADER: admin_key, "Content-Type": "application/json"}
        self.timeout = timeout

    def _post(self, path: str, body: dict | None = None, alive: Callable[[], bool] | None = None) -> bytes:
        """POST to the repository API. With ``alive``, the call is given up as soon as it says the server is gone:
        a load can rightly take minutes, but one sent to a server that then aborted may hang to the timeout
        (its connection stays open in the stubs), and the server is not started again meanwhile."""
        request = urllib.request.Request(self.base + path, data=json.dumps(body or {}).encode(), method="POST",
                                         headers=self.headers)

        def call() -> bytes:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                raise RuntimeError(f"{path}: HTTP {exc.code}: {detail}") from None

        if alive is None:
            return call()
        outcome: list[bytes | BaseException] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:  # handed to the waiting thread
                outcome.append(exc)

        worker = threading.Thread(target=run, name="triton-vlm-control", daemon=True)  # dies with us if left
        worker.start()
        while worker.is_alive():
            worker.join(ALIVE_POLL_S)
            if worker.is_alive() and not alive():
                raise RuntimeError(f"{path}: tritonserver exited during the call")
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def index(self) -> dict[str, dict[str, str]]:
        """Every model of the repository: ``{name: {"state": READY|UNAVAILABLE|..., "reason": ...}}``."""
        return {m["name"]: {"state": m.get("state", ""), "reason": m.get("reason", "")}
                for m in json.loads(self._post("/index") or b"[]")}

    def live(self, timeout: float = 5.0) -> bool:
        """Whether the server answers ``/v2/health/live`` (open to all: no admin key)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=timeout) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False

    def load(self, model: str, alive: Callable[[], bool] | None = None) -> None:
        self._post(f"/models/{model}/load", alive=alive)

    def unload(self, model: str, alive: Callable[[], bool] | None = None) -> None:
        self._post(f"/models/{model}/unload", alive=alive)


@dataclass
class RecoveryEvent:
    model: str
    detail: str
    started: float
    ready_after_s: float | None = None  # None: the reload failed
    error: str | None = None


#: Seconds a server may go on running after its crash handler began, before it counts as hung there.
CRASH_GRACE_S = 5.0
#: How often a long repository call checks that the server it waits for still runs.
ALIVE_POLL_S = 0.5
#: Triton's crash handler line, for the signals that end a process (not SIGINT/SIGTERM: a normal stop).
_FATAL_SIGNAL_LINE = re.compile(rb"^Signal \((4|6|7|8|11)\) received\.", re.MULTILINE)


class CrashLines:
    """Reads what a log file gained since the last call; tells whether it holds a fatal-signal line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skip()

    def skip(self) -> None:
        """Forget what the file holds so far."""
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._tail = b""

    def new_fatal_signal(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return False
        self._offset += len(data)
        text = self._tail + data
        found = bool(_FATAL_SIGNAL_LINE.search(text))
        self._tail = b"" if found else text[-200:]  # a line split across two reads still matches
        return found


@dataclass
class StubSupervisor:
    """Watches ``server_pid``'s stubs every ``interval`` seconds; reloads a READY model whose stub died."""

    server_pid: int
    control: ModelControl
    interval: float = 0.25
    unload_timeout: float = 60.0
    events: list[RecoveryEvent] = field(default_factory=list)
    #: Called when tritonserver itself died; returns the pid of a new server to watch, or None.
    on_server_exit: Callable[[], int | None] | None = None
    #: Models to reload with a recovered one: forwarders to it (GPU hosts), whose instances are stuck for good
    #: in the requests they had passed on to the dead stub.
    dependents: dict[str, list[str]] = field(default_factory=dict)
    #: A server that answered ``/v2/health/live`` once and then stops answering for this long is killed (then
    #: restarted through ``on_server_exit``). Seen after the Python backend's abort on a dead stub's lock: the
    #: process hangs in its crash handler instead of exiting. 0 turns the watchdog off.
    hang_timeout: float = DEFAULT_HANG_TIMEOUT_S
    #: tritonserver's log file, where its crash handler writes "Signal (6) received." before a backtrace. A server
    #: that wrote that and still runs CRASH_GRACE_S later is killed too: its backtrace can deadlock (malloc's
    #: lock, held by the aborting thread) while its HTTP threads still answer /v2/health/live.
    server_log: Path | None = None

    def __post_init__(self) -> None:
        self._known: dict[int, Stub] = {}
        #: Whether the watched server has answered /v2/health/live yet. Before that, the only stubs that come and
        #: go are Triton's own: each model's config is auto-completed at load by a stub that then exits.
        self._serving = False
        #: Shared-memory regions of every stub seen, to clean up after a forced stop.
        self.regions: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> StubSupervisor:
        if not os.path.isdir(f"/proc/{self.server_pid}"):
            log.warning("no /proc on this system: dead Python stubs will not be detected or replaced")
            return self
        self._thread = threading.Thread(target=self._run, name="triton-vlm-supervisor", daemon=True)
        self._thread.start()
        if self.hang_timeout > 0:
            # Its own thread: the stub loop can sit in a model reload for minutes, against this very server.
            self._watchdog = threading.Thread(target=self._watch, name="triton-vlm-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None:
                thread.join(timeout=30)
        self._thread = self._watchdog = None

    @property
    def recovered(self) -> bool:
        """Whether a model was reloaded after its stub died (the dead version then lingers until exit)."""
        with self._lock:
            return bool(self.events)

    def recoveries(self, model: str | None = None) -> list[RecoveryEvent]:
        with self._lock:
            return [e for e in self.events if model is None or e.model == model]

    # -- the loop -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any surprise
                log.exception("stub supervisor: check failed")

    def _watch(self) -> None:
        armed_pid, last_live = None, time.monotonic()
        crash_lines = CrashLines(self.server_log) if self.server_log is not None else None
        crashed: float | None = None  # when the watched server's crash line was seen
        watched = self.server_pid
        while not self._stop.wait(1.0):
            pid = self.server_pid
            if pid != watched:
                # A new server: what the log holds so far (the last one's crash lines) is not about it.
                watched, crashed = pid, None
                if crash_lines is not None:
                    crash_lines.skip()
            if process_state(pid) in (None, "Z"):
                continue  # dead: the stub loop restarts it
            if crash_lines is not None and crash_lines.new_fatal_signal():
                crashed = time.monotonic()
            if crashed is not None and time.monotonic() - crashed > CRASH_GRACE_S:
                self.kill_hung_server(pid, time.monotonic() - crashed, "still runs after its crash handler began")
                crashed = armed_pid = None
            elif self.control.live():
                armed_pid, last_live = pid, time.monotonic()
            elif armed_pid == pid and time.monotonic() - last_live > self.hang_timeout:
                self.kill_hung_server(pid, time.monotonic() - last_live, "has not answered /v2/health/live")
                armed_pid = None

    def kill_hung_server(self, pid: int, stuck_s: float, why: str = "has not answered /v2/health/live") -> None:
        """End a server that still runs but is stuck (its stubs too: they share its process group)."""
        log.error("tritonserver (pid %d) %s for %.0fs; killing it so that it is started again", pid, why, stuck_s)
        with self._lock:
            self.events.append(RecoveryEvent("(server)", f"tritonserver pid {pid} hung ({why})", time.monotonic()))
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def check(self) -> list[str]:
        """One round: track new stubs, reload models whose stubs died; returns the models reloaded."""
        if process_state(self.server_pid) in (None, "Z"):
            new_pid = self.on_server_exit() if self.on_server_exit is not None else None
            if new_pid is not None and new_pid != self.server_pid:
                log.warning("stub supervisor: watching the new tritonserver (pid %d)", new_pid)
                with self._lock:
                    self.events.append(RecoveryEvent("(server)", f"tritonserver pid {self.server_pid} died",
                                                     time.monotonic()))
                self.server_pid, self._known, self._serving = new_pid, {}, False
            return []
        if not self._serving:
            if not self.control.live(timeout=1.0):
                return []
            self._serving = True
        alive = live_stubs(self.server_pid)
        self.regions.update(stub.region for stub in alive.values() if stub.region)
        dead: dict[str, list[tuple[Stub, str]]] = {}
        for pid, stub in self._known.items():
            if pid not in alive:
                dead.setdefault(stub.model, []).append((stub, exit_reason(pid)))
        self._known = alive
        reloaded = []
        for model, stubs in dead.items():
            if self._stop.is_set():
                break
            detail = "; ".join(f"stub {s.instance} (pid {s.pid}) {why}" for s, why in stubs)
            if self._recover(model, detail):
                reloaded.append(model)
                for dependent in self.dependents.get(model, []):
                    if self._recover(dependent, f"it forwards to {model}, which was reloaded"):
                        reloaded.append(dependent)
            # The unloads ended these models' other stubs on purpose: track only the fresh ones.
            done = {model, *self.dependents.get(model, [])}
            self._known = {pid: s for pid, s in self._known.items() if s.model not in done}
            self._known.update({pid: s for pid, s in live_stubs(self.server_pid).items() if s.model in done})
        return reloaded

    def _recover(self, model: str, detail: str) -> bool:
        try:
            state = self.control.index().get(model, {}).get("state", "")
        except Exception as exc:
            log.warning("stub supervisor: %s; cannot read the model index (%s)", detail, exc)
            return False
        if state != "READY":
            # Unloaded on purpose, failed to load, or being (re)loaded: not ours to revive.
            log.info("model %s: %s while %s; not reloading", model, detail, state or "not loaded")
            return False
        log.error("model %s: %s; reloading the model (Triton does not replace dead stubs)", model, detail)
        event = RecoveryEvent(model, detail, time.monotonic())
        with self._lock:
            self.events.append(event)
        try:
            self.control.unload(model, alive=self._server_alive)  # readiness now says 400, truthfully
            self._wait_unloaded(model)
            self.control.load(model, alive=self._server_alive)
        except Exception as exc:
            event.error = str(exc)
            log.error("model %s: reloading after its stub died failed: %s; it stays unavailable", model, exc)
            return False
        event.ready_after_s = time.monotonic() - event.started
        log.warning("model %s: reloaded in %.1fs after its stub died; serving again", model, event.ready_after_s)
        return True

    def _server_alive(self) -> bool:
        return process_state(self.server_pid) not in (None, "Z")

    def _wait_unloaded(self, model: str) -> None:
        """Until Triton stops calling ``model`` READY. Not until it is unloaded: requests that were in flight on
        the dead stub are never released by the Python backend, so that version stays UNLOADING for good; a
        load still brings up a fresh version beside it."""
        deadline = time.monotonic() + self.unload_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.control.index().get(model, {}).get("state") != "READY":
                return
            time.sleep(0.05)
