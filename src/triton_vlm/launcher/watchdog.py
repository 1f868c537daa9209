"""Kill a tritonserver that still runs but is stuck, so that the launcher starts it again.

Seen after the Python backend's abort on a dead stub's lock: the process hangs in Triton's crash handler instead
of exiting. :class:`HangWatchdog`, a thread of the launcher, kills the server's process group (its stubs too)

- when a server that answered ``/v2/health/live`` once stops answering for ``hang_timeout`` seconds, or
- when the server's log file shows Triton's crash handler line (``Signal (6) received.``) and the server still
  runs :data:`CRASH_GRACE_S` later: the backtrace can deadlock (malloc's lock, held by the aborting thread) while
  its HTTP threads still answer ``/v2/health/live``.

The killed server is then an exited one: the stub supervisor finds it gone and :mod:`triton_vlm.launcher.restarts`
starts it again.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from triton_vlm.launcher.children import signal_group
from triton_vlm.launcher.distribution import LauncherError
from triton_vlm.launcher.procfs import process_state

__all__ = ["CRASH_GRACE_S", "DEFAULT_HANG_TIMEOUT_S", "CrashLines", "HangWatchdog", "hang_timeout"]

log = logging.getLogger("triton_vlm")

#: Seconds a server that answered before may go without answering ``/v2/health/live`` before it is killed.
DEFAULT_HANG_TIMEOUT_S = 30.0
#: Seconds a server may go on running after its crash handler began, before it counts as hung there.
CRASH_GRACE_S = 5.0
#: Triton's crash handler line, for the signals that end a process (not SIGINT/SIGTERM: a normal stop).
_FATAL_SIGNAL_LINE = re.compile(rb"^Signal \((4|6|7|8|11)\) received\.", re.MULTILINE)


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
        """Whether what the file gained since the last call holds a fatal-signal line."""
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


class HangWatchdog:
    """Looks at the server every second on its own thread (the stub supervisor's can sit in a model reload for
    minutes, against this very server) and kills it when it hangs (see the module docstring).

    ``server_pid`` gives the pid to watch (a restart changes it); ``live`` says whether the server answers
    ``/v2/health/live``; ``on_kill(pid, why)`` is told of each kill. ``server_log``: tritonserver's log file,
    where it is a regular file (the crash lines are read from it); None: only liveness counts.
    """

    def __init__(self, server_pid: Callable[[], int], live: Callable[[], bool], hang_timeout: float,
                 server_log: Path | None = None, on_kill: Callable[[int, str], None] | None = None) -> None:
        self.server_pid = server_pid
        self.live = live
        self.hang_timeout = hang_timeout
        self.server_log = server_log
        self.on_kill = on_kill
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        """Start watching on a daemon thread."""
        self._thread = threading.Thread(target=self._watch, name="triton-vlm-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching; waits up to ``timeout`` for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._thread = None

    def _watch(self) -> None:
        armed_pid, last_live = None, time.monotonic()
        crash_lines = CrashLines(self.server_log) if self.server_log is not None else None
        crashed: float | None = None  # when the watched server's crash line was seen
        watched = self.server_pid()
        while not self._stop.wait(1.0):
            pid = self.server_pid()
            if pid != watched:
                # A new server: what the log holds so far (the last one's crash lines) is not about it.
                watched, crashed = pid, None
                if crash_lines is not None:
                    crash_lines.skip()
            if process_state(pid) in (None, "Z"):
                continue  # dead: the stub supervisor has it restarted
            if crash_lines is not None and crash_lines.new_fatal_signal():
                crashed = time.monotonic()
            if crashed is not None and time.monotonic() - crashed > CRASH_GRACE_S:
                self.kill(pid, time.monotonic() - crashed, "still runs after its crash handler began")
                crashed = armed_pid = None
            elif self.live():
                armed_pid, last_live = pid, time.monotonic()
            elif armed_pid == pid and time.monotonic() - last_live > self.hang_timeout:
                self.kill(pid, time.monotonic() - last_live, "has not answered /v2/health/live")
                armed_pid = None

    def kill(self, pid: int, stuck_s: float, why: str = "has not answered /v2/health/live") -> None:
        """End a server that still runs but is stuck (its stubs too: they share its process group)."""
        log.error("tritonserver (pid %d) %s for %.0fs; killing it so that it is started again", pid, why, stuck_s)
        if self.on_kill is not None:
            self.on_kill(pid, why)
        signal_group(pid, signal.SIGKILL)
