"""When tritonserver itself dies: start it again on the same ports, give up, or leave it down.

The Python backend aborts the whole server in some stub crashes (e.g. a decoupled stub killed while it streams),
and the watchdog (:mod:`triton_vlm.launcher.watchdog`) kills a server that hangs. Either way the stub supervisor
(:mod:`triton_vlm.launcher.supervisor`) finds the server process gone and calls
:meth:`ServerRestarts.server_exited`, which decides::

    STARTING --ready()--> SERVING --server died--> RESTARTING --new server spawned--> SERVING
    STARTING --server died--> (stays down: a server that was never ready fails its start, see wait_until_ready)
    SERVING --server died, the (max_restarts + 1)th time within window_s--> GAVE_UP (stays down)
    any state --stopping()--> STOPPING (nothing starts again; a restart still waiting for its ports gives up)

A restart waits until the dead server's ports are free (at most ``port_wait_s``) and then starts the new server at
once: no further delay, and no more than ``max_restarts`` in ``window_s`` (an orchestrator may do better than a
loop).

Threads: :meth:`ServerRestarts.server_exited` runs on the supervisor's thread; the other methods on the launcher's.
Every field is read and written under ``_changed``, which :meth:`ServerRestarts.stays_down` also waits on.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("triton_vlm")

__all__ = ["RestartPolicy", "ServerProcess", "ServerRestarts", "State"]


class State(enum.Enum):
    """Where the one tritonserver of a launch stands (see the module docstring for the transitions)."""

    STARTING = "starting"  # spawned and not ready yet: if it dies, the start failed (it is not restarted)
    SERVING = "serving"  # was ready once: if it dies, it is started again
    RESTARTING = "restarting"  # it died: waiting for its ports, then spawning a new one
    GAVE_UP = "gave up"  # died too often within the window: it stays down
    STOPPING = "stopping"  # the launcher stops it: nothing starts again


class ServerProcess(Protocol):
    """What :class:`ServerRestarts` needs of a server process (``subprocess.Popen`` has it)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


P = TypeVar("P", bound=ServerProcess)


@dataclass(frozen=True)
class RestartPolicy:
    """How often, and after what waits, a dead server is started again."""

    #: At most this many restarts within ``window_s``; the next exit leaves the server down.
    max_restarts: int = 5
    window_s: float = 600.0
    #: How long a restart waits for the dead server's ports to be free before it starts the new one anyway.
    port_wait_s: float = 30.0
    #: How long :meth:`ServerRestarts.stays_down` gives the supervisor (it looks every fraction of a second) to
    #: notice an exit and begin a restart.
    notice_s: float = 10.0
    #: How often a restart looks at the ports again while it waits.
    poll_s: float = 0.2


class ServerRestarts(Generic[P]):
    """The tritonserver process of one launch and its restart state machine.

    ``spawn`` starts a server and returns its process; ``ports_free`` says whether a new one can listen on the
    launch's ports; ``cleanup`` runs on a dead server before anything else (its stubs, its shared memory).
    """

    def __init__(self, spawn: Callable[[], P], ports_free: Callable[[], bool],
                 cleanup: Callable[[P], None] | None = None, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or RestartPolicy()
        self._spawn = spawn
        self._ports_free = ports_free
        self._cleanup = cleanup
        self._clock = clock
        self._changed = threading.Condition()
        self._process: P | None = None
        self._state = State.STARTING
        self._restarts: list[float] = []
        #: Whether a supervisor calls server_exited; without one, a server that exits stays down at once.
        self._supervised = False

    # -- what it holds ------------------------------------------------------------------------------------------
    @property
    def process(self) -> P | None:
        """The current server process; None before :meth:`start` and after :meth:`release`."""
        with self._changed:
            return self._process

    @property
    def state(self) -> State:
        with self._changed:
            return self._state

    @property
    def restarts(self) -> list[float]:
        """When (``clock()``) each restart's new server was spawned, oldest first."""
        with self._changed:
            return list(self._restarts)

    # -- the launcher's side ------------------------------------------------------------------------------------
    def start(self) -> P:
        """Spawn the first server: STARTING."""
        process = self._spawn()
        self.adopt(process)
        return process

    def adopt(self, process: P | None) -> None:
        """Take ``process`` (started elsewhere) as the server: STARTING."""
        with self._changed:
            self._process, self._state = process, State.STARTING
            self._changed.notify_all()

    def supervised(self) -> None:
        """A supervisor now watches the server and calls :meth:`server_exited` when it dies."""
        with self._changed:
            self._supervised = True
            self._changed.notify_all()

    def ready(self) -> None:
        """The server answered ready: from now on it is started again when it dies (STARTING -> SERVING)."""
        with self._changed:
            if self._state is State.STARTING:
                self._state = State.SERVING
                self._changed.notify_all()

    def stopping(self) -> None:
        """The launcher stops the server: nothing starts again (STOPPING), a restart waiting for ports gives up."""
        with self._changed:
            self._state = State.STOPPING
            self._changed.notify_all()

    def release(self) -> P | None:
        """Hand the current process over to be stopped, and forget it."""
        with self._changed:
            process, self._process = self._process, None
            self._changed.notify_all()
            return process

    def stays_down(self, process: P) -> bool:
        """Called once ``process`` has exited: whether it stays down (stopping, gave up, never ready, nobody
        supervises it), after giving the supervisor ``notice_s`` to notice and the whole restart, once begun, to
        finish. False: a new server runs."""
        deadline = time.monotonic() + self.policy.notice_s
        with self._changed:
            while self._process is process and self._supervised and self._state is not State.STARTING:
                if self._state in (State.GAVE_UP, State.STOPPING):
                    return True
                if self._state is State.RESTARTING:
                    self._changed.wait(1.0)  # every way out of RESTARTING notifies
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._process is process or self._state in (State.GAVE_UP, State.STOPPING)

    # -- the supervisor's side ----------------------------------------------------------------------------------
    def server_exited(self) -> int | None:
        """The supervisor found the server process gone: start it again (see the module docstring). Returns the
        pid to watch from now on (a new server's, or the old one's if it still runs), or None: it stays down."""
        with self._changed:
            process = self._process
            if self._state is not State.SERVING or process is None:
                return None
            code = process.poll()
            if code is None:
                return process.pid  # it still runs: nothing to do
            if self._cleanup is not None:
                self._cleanup(process)
            now = self._clock()
            recent = [t for t in self._restarts if now - t < self.policy.window_s]
            if len(recent) >= self.policy.max_restarts:
                log.error("tritonserver exited (code %s) for the %d. time in %.0fs; not restarting it again",
                          code, len(recent) + 1, self.policy.window_s)
                self._state = State.GAVE_UP
                self._changed.notify_all()
                return None
            log.error("tritonserver exited unexpectedly (code %s); starting it again on the same ports", code)
            self._state = State.RESTARTING
            self._changed.notify_all()
            deadline = now + self.policy.port_wait_s
            # wait() lets the lock go: stopping() can come in meanwhile, and then nothing is started.
            while self._state is State.RESTARTING and not self._ports_free() and self._clock() < deadline:
                self._changed.wait(self.policy.poll_s)
            if self._state is not State.RESTARTING:
                return None
            try:
                new = self._spawn()
            except BaseException:
                self._state = State.SERVING  # the supervisor's next look tries again
                self._changed.notify_all()
                raise
            self._process = new
            self._restarts.append(self._clock())
            self._state = State.SERVING
            self._changed.notify_all()
            return new.pid
