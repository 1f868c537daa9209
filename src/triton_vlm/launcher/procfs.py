"""What ``/proc`` tells about tritonserver's children: its Python backend stubs, their state, how they ended.

Read by the stub supervisor (:mod:`triton_vlm.launcher.supervisor`), the watchdog and the launcher's stop.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from triton_vlm.backend.stub_logging import STACKS_SIGNAL

__all__ = ["STUB_NAME", "Stub", "child_pids", "dump_stub_stacks", "exit_reason", "live_stubs", "process_state"]

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


def dump_stub_stacks(server_pid: int) -> list[Stub]:
    """Ask every live stub of the server to print its threads' Python stacks into Triton's log (see
    :func:`triton_vlm.backend.stub_logging.configure_logging`); returns the stubs asked."""
    asked = []
    for stub in live_stubs(server_pid).values():
        try:
            os.kill(stub.pid, STACKS_SIGNAL)
        except OSError:  # it ended meanwhile
            continue
        asked.append(stub)
    return asked


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
