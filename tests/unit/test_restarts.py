"""The restart state machine of the launcher (triton_vlm.launcher.restarts): a dead server is started again once
its ports are free, a server that was never ready or is being stopped is not, and after too many restarts it stays
down; a hung server is killed by the watchdog and then restarted like a crashed one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.launcher.procfs import process_state
from triton_vlm.launcher.restarts import RestartPolicy, ServerRestarts, State
from triton_vlm.launcher.supervisor import StubSupervisor

from .helpers import free_port

FAST = RestartPolicy(port_wait_s=5.0, notice_s=0.5, poll_s=0.01)


@dataclass
class FakeProcess:
    """A server process as the state machine sees it: a pid and an exit code once it has "died"."""

    pid: int
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class Launch:
    """What a ServerRestarts is given: a spawn that counts, ports that are free when told, a cleanup log."""

    ports: Callable[[], bool] = lambda: True
    spawned: list[FakeProcess] = field(default_factory=list)
    cleaned: list[FakeProcess] = field(default_factory=list)
    now: float = 1000.0
    fail_spawns: int = 0

    def spawn(self) -> FakeProcess:
        if self.fail_spawns:
            self.fail_spawns -= 1
            raise OSError("tritonserver: cannot execute")
        process = FakeProcess(pid=100 + len(self.spawned))
        self.spawned.append(process)
        return process

    def machine(self, policy: RestartPolicy = FAST) -> ServerRestarts[FakeProcess]:
        return ServerRestarts(self.spawn, lambda: self.ports(), cleanup=self.cleaned.append, policy=policy,
                              clock=lambda: self.now)


def serving(launch: Launch, policy: RestartPolicy = FAST) -> ServerRestarts[FakeProcess]:
    """A machine whose first server was ready once and is supervised."""
    machine = launch.machine(policy)
    machine.start()
    machine.ready()
    machine.supervised()
    return machine


def crash(machine: ServerRestarts[FakeProcess], code: int = -9) -> FakeProcess:
    process = machine.process
    assert process is not None
    process.code = code
    return process


def test_a_crash_after_ready_is_restarted_once_the_ports_are_free(caplog: pytest.LogCaptureFixture) -> None:
    answers = iter([False, False, True])
    launch = Launch(ports=lambda: next(answers))
    machine = serving(launch)
    assert machine.state is State.SERVING and len(launch.spawned) == 1
    dead = crash(machine)
    assert machine.server_exited() == 101
    assert launch.cleaned == [dead]  # its stubs and shared memory first
    assert machine.process is launch.spawned[1] and machine.state is State.SERVING
    assert machine.restarts == [1000.0]
    assert "tritonserver exited unexpectedly (code -9); starting it again on the same ports" in caplog.text
    assert machine.stays_down(dead) is False  # wait() goes on with the new server


def test_ports_that_stay_busy_delay_the_restart_only_so_long() -> None:
    launch = Launch()
    machine = ServerRestarts(launch.spawn, lambda: False, policy=RestartPolicy(port_wait_s=0.3, poll_s=0.01))
    machine.start()
    machine.ready()
    crash(machine)
    started = time.monotonic()
    assert machine.server_exited() == 101
    assert 0.25 < time.monotonic() - started < 3


def test_a_server_that_still_runs_is_left_alone() -> None:
    launch = Launch()
    machine = serving(launch)
    assert machine.server_exited() == 100
    assert len(launch.spawned) == 1 and launch.cleaned == [] and machine.state is State.SERVING


def test_a_server_that_dies_before_it_was_ready_is_not_restarted() -> None:
    launch = Launch()
    machine = launch.machine()
    machine.start()
    machine.supervised()
    dead = crash(machine, code=1)
    assert machine.server_exited() is None
    assert len(launch.spawned) == 1 and machine.state is State.STARTING
    assert machine.stays_down(dead) is True  # wait_until_ready reports the failed start


def test_give_up_after_max_restarts_within_the_window(caplog: pytest.LogCaptureFixture) -> None:
    launch = Launch()
    machine = serving(launch, RestartPolicy(max_restarts=3, window_s=100.0, poll_s=0.01))
    for _ in range(3):
        crash(machine)
        assert machine.server_exited() is not None
        launch.now += 10
    dead = crash(machine)
    assert machine.server_exited() is None
    assert machine.state is State.GAVE_UP and len(launch.spawned) == 4
    assert "for the 4. time in 100s; not restarting it again" in caplog.text
    assert machine.stays_down(dead) is True
    caplog.clear()
    assert machine.server_exited() is None  # the supervisor asks again: nothing more, not even a log line
    assert caplog.text == "" and len(launch.spawned) == 4


def test_restarts_older_than_the_window_no_longer_count() -> None:
    launch = Launch()
    machine = serving(launch, RestartPolicy(max_restarts=2, window_s=100.0, poll_s=0.01))
    for _ in range(2):
        crash(machine)
        assert machine.server_exited() is not None
    launch.now += 101
    crash(machine)
    assert machine.server_exited() is not None and machine.state is State.SERVING
    assert len(machine.restarts) == 3


def test_stop_during_a_restart_starts_nothing() -> None:
    """The launcher stops while a restart waits for the ports: the restart gives up at once, nothing is spawned,
    and the launcher gets the dead process to finish stopping."""
    launch = Launch(ports=lambda: False)
    machine = serving(launch, RestartPolicy(port_wait_s=60.0, poll_s=0.05))
    dead = crash(machine)
    outcome: list[int | None] = []
    thread = threading.Thread(target=lambda: outcome.append(machine.server_exited()))
    thread.start()
    deadline = time.monotonic() + 5
    while machine.state is not State.RESTARTING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert machine.state is State.RESTARTING
    machine.stopping()
    thread.join(timeout=5)
    assert not thread.is_alive() and outcome == [None]
    assert len(launch.spawned) == 1 and machine.state is State.STOPPING
    assert machine.stays_down(dead) is True
    assert machine.release() is dead and machine.process is None


def test_nothing_restarts_once_stopping() -> None:
    launch = Launch()
    machine = serving(launch)
    machine.stopping()
    crash(machine)
    assert machine.server_exited() is None and len(launch.spawned) == 1 and launch.cleaned == []
    machine.ready()  # a late readiness does not undo the stop
    assert machine.state is State.STOPPING


def test_a_failed_spawn_is_tried_again_at_the_next_look() -> None:
    launch = Launch()
    machine = serving(launch)
    launch.fail_spawns = 1
    crash(machine)
    with pytest.raises(OSError, match="cannot execute"):
        machine.server_exited()
    assert machine.state is State.SERVING and machine.restarts == []
    assert machine.server_exited() == 101 and len(machine.restarts) == 1


def test_stays_down_without_a_supervisor_or_when_nobody_restarts_it() -> None:
    launch = Launch()
    machine = launch.machine()
    machine.start()
    machine.ready()
    dead = crash(machine)
    assert machine.stays_down(dead) is True  # nobody supervises it: at once
    machine.supervised()
    started = time.monotonic()
    assert machine.stays_down(dead) is True  # supervised, but no restart came within notice_s
    assert time.monotonic() - started >= FAST.notice_s * 0.9


def test_stays_down_waits_out_a_restart_longer_than_its_notice() -> None:
    """wait() must not end the launcher while a restart waits for the ports longer than notice_s."""
    free = threading.Event()
    launch = Launch(ports=free.is_set)
    machine = serving(launch, RestartPolicy(port_wait_s=30.0, notice_s=0.2, poll_s=0.01))
    dead = crash(machine)
    thread = threading.Thread(target=machine.server_exited)
    thread.start()
    threading.Timer(0.8, free.set).start()
    assert machine.stays_down(dead) is False
    assert machine.process is launch.spawned[1]
    thread.join(timeout=5)


# -- with real processes: the launcher's own wiring, and the watchdog's kill -----------------------------------------
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TritonServer]:
    ports = sorted({free_port() for _ in range(3)})
    while len(ports) < 3:
        ports = sorted({free_port() for _ in range(3)})
    server = TritonServer(ServerOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                                        work_dir=tmp_path))
    server._command, server._env = SLEEPER, dict(os.environ)  # a "tritonserver" that runs until killed
    yield server
    server.stop(timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_the_server_is_started_again_with_the_same_command_and_wait_follows_it(server: TritonServer) -> None:
    first = server._restarts.start()
    server._restarts.ready()
    server._restarts.supervised()
    codes: list[int] = []
    waiter = threading.Thread(target=lambda: codes.append(server.wait(poll_s=0.05)))
    waiter.start()
    first.kill()
    first.wait()
    assert server._restarts.server_exited() == server.process.pid != first.pid  # type: ignore[union-attr]
    assert server.process is not None and server.process.args == SLEEPER and server.process.poll() is None
    assert len(server.server_restarts) == 1
    time.sleep(0.3)
    assert waiter.is_alive()  # wait() blocks on across the restart
    assert server.stop(timeout=5) is not None
    waiter.join(timeout=15)
    assert not waiter.is_alive() and codes and codes[0] != 0


class Hanging:
    """Triton's liveness as the watchdog sees it: answers until ``hang`` is set."""

    def __init__(self) -> None:
        self.hang = threading.Event()

    def live(self, timeout: float = 5.0) -> bool:
        return not self.hang.is_set()

    def index(self) -> dict[str, dict[str, str]]:
        return {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_hung_server_is_killed_then_restarted(caplog: pytest.LogCaptureFixture) -> None:
    """hang -> kill -> restart: the watchdog kills a server that stopped answering, the stub loop finds it dead,
    and the state machine starts a new one, which the supervisor then watches."""
    caplog.set_level(logging.INFO, logger="triton_vlm")
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        spawned.append(subprocess.Popen(SLEEPER, start_new_session=True))
        return spawned[-1]

    machine: ServerRestarts[subprocess.Popen[bytes]] = ServerRestarts(spawn, lambda: True, policy=FAST)
    first = machine.start()
    machine.ready()
    control = Hanging()
    watcher = StubSupervisor(first.pid, control, on_server_exit=machine.server_exited,  # type: ignore[arg-type]
                             interval=0.05, hang_timeout=1.0)
    watcher.start()
    machine.supervised()
    try:
        time.sleep(1.5)  # answered: the watchdog is armed
        control.hang.set()
        assert first.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while watcher.server_pid == first.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(spawned) == 2 and machine.process is spawned[1]
        assert watcher.server_pid == spawned[1].pid and process_state(spawned[1].pid) not in (None, "Z")
        details = [event.detail for event in watcher.recoveries("(server)")]
        assert any("hung" in d for d in details) and any("died" in d for d in details), details
        assert "has not answered /v2/health/live" in caplog.text
    finally:
        watcher.stop()
        machine.stopping()
        for process in spawned:
            if process.poll() is None:
                process.kill()
            process.wait()

