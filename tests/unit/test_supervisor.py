"""The stub supervisor on real processes that look like stubs (their command line is a stub's), the watchdog that
kills a hung server, the repository API client, and what /proc tells about processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from triton_vlm.launcher import procfs, supervisor, watchdog
from triton_vlm.launcher.control import ALIVE_POLL_S, ModelControl
from triton_vlm.launcher.distribution import LauncherError


def _fake_stub(tmp_path: Path, model: str, instance: str) -> subprocess.Popen[bytes]:
    """A child of this process whose command line is a stub's: Python runs the "model.py" (a sleep)."""
    model_py = tmp_path / "models" / model / "1" / "model.py"
    model_py.parent.mkdir(parents=True, exist_ok=True)
    model_py.write_text("import time\ntime.sleep(120)\n")
    argv = [str(tmp_path / "backends" / "python" / procfs.STUB_NAME), str(model_py),
            f"triton_python_backend_shm_region_{instance}", "1048576", "1048576", str(os.getpid()),
            str(tmp_path / "backends" / "python"), "336", instance, "DEFAULT"]
    process = subprocess.Popen(argv, executable=sys.executable)
    # Until the child has exec'd, /proc shows the parent's command line: the stub is not there to be seen yet.
    deadline = time.monotonic() + 10
    while process.pid not in procfs.live_stubs(os.getpid()):
        assert time.monotonic() < deadline, f"fake stub {instance} never showed its command line"
        time.sleep(0.01)
    return process


class FakeControl:
    def __init__(self, state: str = "READY") -> None:
        self.state = state
        self.calls: list[tuple[str, str]] = []

    def index(self) -> dict[str, dict[str, str]]:
        unloading = self.calls[-1][1] if self.calls and self.calls[-1][0] == "unload" else None
        return {m: {"state": "UNLOADING" if m == unloading else self.state, "reason": ""}
                for m in ("llava", "kosmos2", "llava_stream")}

    def unload(self, model: str, alive: Any = None) -> None:
        self.calls.append(("unload", model))

    def load(self, model: str, alive: Any = None) -> None:
        self.calls.append(("load", model))

    def live(self, timeout: float = 5.0) -> bool:
        return True


def _wait_state(pid: int, states: tuple[str | None, ...]) -> None:
    deadline = time.monotonic() + 10
    while procfs.process_state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_supervisor_reloads_a_ready_model_whose_stub_died(tmp_path: Path) -> None:
    llava, kosmos = _fake_stub(tmp_path, "llava", "llava_0_0"), _fake_stub(tmp_path, "kosmos2", "kosmos2_0_0")
    try:
        stubs = procfs.live_stubs(os.getpid())
        assert {(s.model, s.instance, s.region) for s in stubs.values()} >= {
            ("llava", "llava_0_0", "triton_python_backend_shm_region_llava_0_0"),
            ("kosmos2", "kosmos2_0_0", "triton_python_backend_shm_region_kosmos2_0_0")}
        control = FakeControl()
        watcher = supervisor.StubSupervisor(os.getpid(), control)  # type: ignore[arg-type]
        assert watcher.check() == []  # first look: only tracking
        assert "triton_python_backend_shm_region_llava_0_0" in watcher.regions
        os.kill(llava.pid, signal.SIGKILL)
        _wait_state(llava.pid, ("Z",))
        assert procfs.exit_reason(llava.pid) == "killed by SIGKILL"
        assert llava.pid not in procfs.live_stubs(os.getpid())  # a zombie is not a live stub
        assert watcher.check() == ["llava"]
        assert control.calls == [("unload", "llava"), ("load", "llava")]
        (event,) = watcher.recoveries("llava")
        assert "llava_0_0" in event.detail and "SIGKILL" in event.detail and event.ready_after_s is not None
        assert watcher.recovered and watcher.check() == []  # handled once
    finally:
        for process in (llava, kosmos):
            process.kill()
            process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_supervisor_reloads_the_forwarders_of_a_recovered_model(tmp_path: Path) -> None:
    engine = _fake_stub(tmp_path, "llava_stream", "llava_stream_0_0")
    forwarder = _fake_stub(tmp_path, "llava", "llava_0_0")
    try:
        control = FakeControl()
        watcher = supervisor.StubSupervisor(os.getpid(), control,  # type: ignore[arg-type]
                                            dependents={"llava_stream": ["llava"]})
        watcher.check()
        engine.kill()
        _wait_state(engine.pid, ("Z",))
        assert watcher.check() == ["llava_stream", "llava"]
        assert control.calls == [("unload", "llava_stream"), ("load", "llava_stream"),
                                 ("unload", "llava"), ("load", "llava")]
        assert watcher.check() == []
    finally:
        for process in (engine, forwarder):
            process.kill()
            process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_supervisor_leaves_models_that_are_not_ready_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="triton_vlm")
    stub = _fake_stub(tmp_path, "kosmos2", "kosmos2_0_0")
    try:
        control = FakeControl(state="UNAVAILABLE")  # unloaded on purpose, or failed to load
        watcher = supervisor.StubSupervisor(os.getpid(), control)  # type: ignore[arg-type]
        watcher.check()
        stub.terminate()
        _wait_state(stub.pid, ("Z", None))
        assert watcher.check() == [] and control.calls == [] and not watcher.recovered
        assert "not reloading" in caplog.text
    finally:
        stub.kill()
        stub.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_supervisor_ignores_stubs_that_end_before_the_server_answers(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """At start Triton runs a stub per model to complete its config, and that stub exits: no warning, no reload."""
    caplog.set_level(logging.INFO, logger="triton_vlm")

    class Starting(FakeControl):
        answering = False

        def live(self, timeout: float = 5.0) -> bool:
            return self.answering

    control = Starting()
    watcher = supervisor.StubSupervisor(os.getpid(), control)  # type: ignore[arg-type]
    config_stub = _fake_stub(tmp_path, "llava", "llava_0_0")
    try:
        assert watcher.check() == []
        config_stub.kill()
        _wait_state(config_stub.pid, ("Z",))
        assert watcher.check() == []
    finally:
        config_stub.wait()
    control.answering = True
    served = _fake_stub(tmp_path, "kosmos2", "kosmos2_0_0")
    try:
        assert watcher.check() == []  # serving now: tracking starts
        served.kill()
        _wait_state(served.pid, ("Z",))
        assert watcher.check() == ["kosmos2"]  # a stub of a serving server is still recovered
    finally:
        served.wait()
    assert control.calls == [("unload", "kosmos2"), ("load", "kosmos2")]
    assert "llava" not in caplog.text


def test_supervisor_reports_a_failed_reload(tmp_path: Path) -> None:
    stub = _fake_stub(tmp_path, "llava", "llava_0_0")

    class Failing(FakeControl):
        def load(self, model: str, alive: Any = None) -> None:
            raise RuntimeError("HTTP 400: failed to load")

    try:
        watcher = supervisor.StubSupervisor(os.getpid(), Failing())  # type: ignore[arg-type]
        watcher.check()
        stub.kill()
        _wait_state(stub.pid, ("Z",))
        assert watcher.check() == []
        (event,) = watcher.recoveries()
        assert event.error == "HTTP 400: failed to load" and event.ready_after_s is None
    finally:
        stub.wait()


@pytest.fixture
def repository_api() -> Iterator[tuple[str, threading.Event]]:
    """A stand-in for Triton's repository API: loads of "slow" wait until released, "bad" is refused."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if "/bad/" in self.path:
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b"failed to load")
                return
            if "/slow/" in self.path:
                release.wait(30)
            self.send_response(200)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", release
    release.set()
    server.shutdown()


def test_a_reload_call_is_given_up_when_the_server_dies_during_it(repository_api: tuple[str, threading.Event]) -> None:
    """The supervisor's load waits for a server that may abort meanwhile: it stops waiting as soon as the
    server is gone (else the restart waited out the call's 300 s timeout), and works as before otherwise."""
    url, release = repository_api
    control = ModelControl(url, "key", timeout=60)
    control.load("fast", alive=lambda: True)
    with pytest.raises(RuntimeError, match="HTTP 400: failed to load"):
        control.load("bad", alive=lambda: True)
    gone_at = time.monotonic() + 0.3
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="tritonserver exited during the call"):
        control.load("slow", alive=lambda: time.monotonic() < gone_at)
    assert time.monotonic() - started < 0.3 + 2 * ALIVE_POLL_S
    release.set()


def test_supervisor_watches_a_restarted_server() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    calls: list[int] = []
    watcher = supervisor.StubSupervisor(dead.pid, FakeControl(),  # type: ignore[arg-type]
                                        on_server_exit=lambda: calls.append(1) or os.getpid())
    watcher.check()
    assert calls == [1] and watcher.server_pid == os.getpid()
    assert watcher.recoveries("(server)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_server_that_runs_but_stops_answering_is_killed() -> None:
    """The Python backend's abort on a dead stub's lock can leave tritonserver hanging in its crash handler: alive,
    answering nothing. The watchdog kills such a server (once it had answered), so the stub loop restarts it."""

    class Control(FakeControl):
        answering = True

        def live(self, timeout: float = 5.0) -> bool:
            return self.answering

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    control = Control()
    watcher = supervisor.StubSupervisor(server.pid, control, hang_timeout=1.5)  # type: ignore[arg-type]
    watcher.start()
    try:
        time.sleep(1.5)  # answered: the watchdog is armed
        assert server.poll() is None
        control.answering = False
        assert server.wait(timeout=10) == -signal.SIGKILL
        assert any("hung" in event.detail for event in watcher.recoveries("(server)"))
    finally:
        watcher.stop()
        if server.poll() is None:
            server.kill()


#: A stand-in for tritonserver: a process that runs (and answers nothing) until killed.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


class Answering(FakeControl):
    """A server whose HTTP threads answer /v2/health/live whatever else goes on in it."""

    def live(self, timeout: float = 5.0) -> bool:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_server_stuck_in_its_crash_handler_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton logged a fatal signal but its process goes on (the backtrace deadlocked) while its HTTP threads
    still answer /v2/health/live: killed once the grace period is over, so the stub loop starts it again."""

    monkeypatch.setattr(watchdog, "CRASH_GRACE_S", 0.5)
    log_path = tmp_path / "tritonserver.log"
    log_path.write_text("I1125 model_lifecycle.cc:472] loading: llava:1\n")
    server = subprocess.Popen(SLEEPER, start_new_session=True)
    watcher = supervisor.StubSupervisor(server.pid, Answering(), hang_timeout=30,  # type: ignore[arg-type]
                                        server_log=log_path)
    watcher.start()
    try:
        with open(log_path, "a") as log:
            log.write("Signal (15) received.\n")  # a normal stop asked for: not a crash
            log.flush()
            time.sleep(2.5)
            assert server.poll() is None and not watcher.recoveries("(server)")
            log.write("terminate called after throwing an instance of 'boost::interprocess::lock_exception'\n"
                      "Signal (6) rec")
            log.flush()
            time.sleep(1.2)
            log.write("eived.\n 0# 0x0000564BA749C52D in tritonserver\n")  # the line came in two writes
            log.flush()
        assert server.wait(timeout=10) == -signal.SIGKILL
        (event,) = watcher.recoveries("(server)")
        assert "crash handler" in event.detail
    finally:
        watcher.stop()
        if server.poll() is None:
            server.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_crash_line_of_the_last_server_spares_the_restarted_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The server crashed and exited by itself; the stub loop started a new one, whose log is the same file.
    The old crash line is not the new server's: it keeps running (a fresh-clone CI run saw the restarted server
    killed 5 s after its start)."""

    monkeypatch.setattr(watchdog, "CRASH_GRACE_S", 0.5)
    log_path = tmp_path / "tritonserver.log"
    log_path.write_text("")
    old = subprocess.Popen(SLEEPER, start_new_session=True)
    new = subprocess.Popen(SLEEPER, start_new_session=True)
    watcher = supervisor.StubSupervisor(old.pid, Answering(), hang_timeout=30,  # type: ignore[arg-type]
                                        server_log=log_path)
    watcher.start()
    try:
        time.sleep(1.5)
        with open(log_path, "a") as log:
            log.write("Signal (6) received.\n 0# 0x0000564BA749C52D in tritonserver\n")
        old.kill()
        old.wait()
        watcher.server_pid = new.pid  # as the stub loop does once it has started the new server
        time.sleep(3.0)
        assert new.poll() is None and not watcher.recoveries("(server)")
        with open(log_path, "a") as log:  # the new server's own crash still counts
            log.write("Signal (11) received.\n")
        assert new.wait(timeout=10) == -signal.SIGKILL
    finally:
        watcher.stop()
        for process in (old, new):
            if process.poll() is None:
                process.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_server_that_never_answered_yet_is_left_to_start() -> None:
    """Not armed before its first answer: a server still loading its models at start is no hung server."""

    class Silent(FakeControl):
        def live(self, timeout: float = 5.0) -> bool:
            return False

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    watcher = supervisor.StubSupervisor(server.pid, Silent(), hang_timeout=0.5)  # type: ignore[arg-type]
    watcher.start()
    try:
        time.sleep(2.5)
        assert server.poll() is None and not watcher.recoveries("(server)")
    finally:
        watcher.stop()
        server.kill()
        server.wait()


def test_hang_timeout_from_the_environment() -> None:
    assert watchdog.hang_timeout({}) == watchdog.DEFAULT_HANG_TIMEOUT_S
    assert watchdog.hang_timeout({"TRITON_VLM_HANG_TIMEOUT_S": "0"}) == 0  # off
    for bad in ("soon", "-1"):
        with pytest.raises(LauncherError, match="TRITON_VLM_HANG_TIMEOUT_S"):
            watchdog.hang_timeout({"TRITON_VLM_HANG_TIMEOUT_S": bad})


def test_process_helpers_on_missing_processes() -> None:
    assert procfs.process_state(2**22 + 11) is None
    assert procfs.child_pids(2**22 + 11) == []
    assert procfs.exit_reason(2**22 + 11) == "exited"

