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

The repository API is only reachable with the launcher's admin header (see
:class:`~triton_vlm.launcher.control.ModelControl`). The stubs are found through :mod:`triton_vlm.launcher.procfs`.
When tritonserver itself dies, the supervisor asks ``on_server_exit`` (the launcher's
:class:`~triton_vlm.launcher.restarts.ServerRestarts`) for a new one to watch; a server that hangs instead is killed
by :class:`~triton_vlm.launcher.watchdog.HangWatchdog`, which the supervisor runs beside its own loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from triton_vlm.launcher.control import ModelControl
from triton_vlm.launcher.procfs import Stub, exit_reason, live_stubs, process_state
from triton_vlm.launcher.watchdog import DEFAULT_HANG_TIMEOUT_S, HangWatchdog

__all__ = ["RecoveryEvent", "StubSupervisor"]

log = logging.getLogger("triton_vlm")


@dataclass
class RecoveryEvent:
    """One recovery: a model reloaded after its stub died, or ``"(server)"``: tritonserver restarted or killed."""

    model: str
    detail: str
    started: float
    ready_after_s: float | None = None  # None: the reload failed
    error: str | None = None


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
        self._watchdog: HangWatchdog | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> StubSupervisor:
        """Start the stub loop, and the watchdog unless ``hang_timeout`` is 0 (daemon threads)."""
        if not os.path.isdir(f"/proc/{self.server_pid}"):
            log.warning("no /proc on this system: dead Python stubs will not be detected or replaced")
            return self
        self._thread = threading.Thread(target=self._run, name="triton-vlm-supervisor", daemon=True)
        self._thread.start()
        if self.hang_timeout > 0:
            self._watchdog = HangWatchdog(lambda: self.server_pid, self.control.live, self.hang_timeout,
                                          self.server_log, on_kill=self._server_killed).start()
        return self

    def stop(self) -> None:
        """Stop both threads (each is given up to 30 s)."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.stop(timeout=30)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = self._watchdog = None

    @property
    def recovered(self) -> bool:
        """Whether a model was reloaded after its stub died (the dead version then lingers until exit)."""
        with self._lock:
            return bool(self.events)

    def recoveries(self, model: str | None = None) -> list[RecoveryEvent]:
        """The recoveries so far (of ``model`` only, if given), oldest first."""
        with self._lock:
            return [e for e in self.events if model is None or e.model == model]

    # -- the loop -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any surprise
                log.exception("stub supervisor: check failed")

    def _server_killed(self, pid: int, why: str) -> None:
        """The watchdog killed a hung server: the stub loop finds it dead next and has it started again."""
        with self._lock:
            self.events.append(RecoveryEvent("(server)", f"tritonserver pid {pid} hung ({why})", time.monotonic()))

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
