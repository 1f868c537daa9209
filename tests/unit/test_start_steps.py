"""TritonServer.start's steps one by one (triton_vlm.launcher.server): ports, model selection, forwarders,
overload limits, the command line, the spawn, the supervisor and the OpenAI front. How they run together:
test_reliability.py's command-line tests and the integration tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from triton_vlm._protocol.model_config import load_model_config
from triton_vlm.launcher import LauncherError, ServerOptions, TritonServer
from triton_vlm.launcher import server as server_module
from triton_vlm.launcher.repository import render_repository
from triton_vlm.launcher.restarts import State
from triton_vlm.launcher.scaffold import add_model
from triton_vlm.openai import OpenAIOptions

from .helpers import REPOSITORY, free_port


def distinct_ports(count: int) -> list[int]:
    ports = sorted({free_port() for _ in range(count)})
    while len(ports) < count:
        ports = sorted({free_port() for _ in range(count)})
    return ports


def make_server(tmp_path: Path, **options: Any) -> TritonServer:
    http, grpc, metrics = distinct_ports(3)
    return TritonServer(ServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, work_dir=tmp_path,
                                      **options))


# -- ports ----------------------------------------------------------------------------------------------------------
def test_check_ports_free_names_the_busy_port_and_its_flag(tmp_path: Path) -> None:
    openai_port = free_port()
    server = make_server(tmp_path, openai=OpenAIOptions(port=openai_port))
    server._check_ports_free()  # all free
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", openai_port))
        sock.listen()
        with pytest.raises(LauncherError, match=f"OpenAI port {openai_port} is already in use.*--openai-port"):
            server._check_ports_free()


# -- models ---------------------------------------------------------------------------------------------------------
def test_select_models_adds_the_companions_after_the_public_models(tmp_path: Path) -> None:
    server = make_server(tmp_path, models=("kosmos2", "llava"))
    streams = server._select_models(REPOSITORY)
    assert streams == {"kosmos2": ["kosmos2_stream"], "llava": ["llava_stream"]}
    assert server.models == ["kosmos2", "llava", "kosmos2_stream", "llava_stream"]
    everything = make_server(tmp_path / "all")
    everything._select_models(REPOSITORY)
    assert everything.models[:7] == ["kosmos2", "llava", "llava_next", "llava_onevision", "moondream2", "qwen2_vl",
                                     "smolvlm"]
    assert everything.models[7:] == [f"{m}_stream" for m in everything.models[:7]]  # every family has an engine


def test_select_models_refuses_an_empty_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LauncherError, match="no servable models in"):
        make_server(tmp_path)._select_models(tmp_path / "empty")


@pytest.mark.parametrize("engine, kind, forwards", [
    ("auto", None, True),  # a GPU host: the public model forwards to its engine companion
    ("auto", "KIND_CPU", False),
    ("on", "KIND_CPU", True),
    ("off", None, False),
])
def test_add_forwarders_where_the_engine_serves(tmp_path: Path, engine: str, kind: str | None,
                                                forwards: bool) -> None:
    # llava, and a model of the auto family (no engine) as `triton-vlm add-model` writes one.
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY / "llava", repository / "llava")
    add_model(repository, "vlm", "HuggingFaceTB/SmolVLM-256M-Instruct", family="auto")
    server = make_server(tmp_path, models=("llava", "vlm"), engine=engine, forwarder_instances=3,
                         model_repository=repository)
    streams = server._select_models(repository)
    served = render_repository(repository, tmp_path / "models", server.models, kind)
    server._add_forwarders(served, streams, kind)
    config = load_model_config(served / "llava" / "config.pbtxt")
    assert (config.parameters["forward_to"].string_value == "llava_stream") is forwards
    assert server._forwarders == ({"llava_stream": ["llava"]} if forwards else {})
    if forwards:
        assert config.parameters["forward_grpc_url"].string_value == server.grpc_url
        assert [g.count for g in config.instance_group] == [3]
    assert "forward_to" not in load_model_config(served / "vlm" / "config.pbtxt").parameters


# -- overload limits --------------------------------------------------------------------------------------------------
def test_apply_overload_limits_writes_each_model_and_counts_its_stubs(tmp_path: Path) -> None:
    server = make_server(tmp_path, models=("kosmos2",), max_queue_size=4, batch_delay_us=50)
    server._select_models(REPOSITORY)
    served = render_repository(REPOSITORY, tmp_path / "models", server.models, "KIND_CPU")
    env = {"TRITON_VLM_KOSMOS2_STREAM_MAX_QUEUE_SIZE": "9"}
    assert server._apply_overload_limits(served, env) == 2  # one instance each of kosmos2 and kosmos2_stream
    public = load_model_config(served / "kosmos2" / "config.pbtxt").dynamic_batching
    assert public.default_queue_policy.max_queue_size == 4 and public.max_queue_delay_microseconds == 50
    stream = load_model_config(served / "kosmos2_stream" / "config.pbtxt")
    assert stream.parameters["max_queue_size"].string_value == "9"  # its own environment wins


# -- the command line and the spawn -----------------------------------------------------------------------------------
def test_command_line(tmp_path: Path) -> None:
    server = make_server(tmp_path, host="0.0.0.0", log_verbose=2)
    command = server._command_line(Path("/opt/tritonserver"), tmp_path / "models", tmp_path / "backends")
    opts = server.options
    assert command[:3] == ["/opt/tritonserver", f"--model-repository={tmp_path / 'models'}",
                           f"--backend-directory={tmp_path / 'backends'}"]
    assert {f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}", f"--metrics-port={opts.metrics_port}",
            "--http-address=0.0.0.0", "--log-verbose=2", "--model-control-mode=explicit",
            "--load-model=*", "--exit-timeout-secs=30"} <= set(command)
    assert f"--http-restricted-api={server_module.RESTRICTED_APIS}:triton-vlm-admin-key={server.admin_key}" in command


@pytest.fixture
def sleeping(tmp_path: Path) -> Iterator[TritonServer]:
    """A server whose "tritonserver" is a process that sleeps until it is stopped."""
    server = make_server(tmp_path)
    server.models = ["llava"]
    process = server._spawn_first([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                  "KIND_CPU")
    assert server.process is process
    yield server
    server.stop(timeout=5)


def test_spawn_first_starts_the_server_in_its_own_session(sleeping: TritonServer) -> None:
    process = sleeping.process
    assert process is not None and process.poll() is None
    assert os.getpgid(process.pid) == process.pid  # its own process group: stopped as a whole with its stubs
    assert sleeping._restarts.state is State.STARTING and sleeping.server_restarts == []
    again = sleeping._spawn()  # what a restart runs
    again.kill()
    again.wait()
    assert again.args == process.args
    assert sleeping.stop(timeout=5) == -15 and sleeping.process is None


def test_start_supervisor_watches_the_server_with_the_launch_settings(sleeping: TritonServer) -> None:
    sleeping._forwarders = {"llava_stream": ["llava"]}
    assert sleeping.process is not None
    sleeping._start_supervisor(sleeping.process.pid, {"TRITON_VLM_HANG_TIMEOUT_S": "7"})
    watcher = sleeping.supervisor
    assert watcher is not None
    assert watcher.server_pid == sleeping.process.pid and watcher.hang_timeout == 7.0
    assert watcher.dependents == {"llava_stream": ["llava"]}
    assert watcher.on_server_exit == sleeping._restarts.server_exited
    assert watcher.control.http_url == sleeping.http_url and sleeping._restarts._supervised
    with pytest.raises(LauncherError, match="TRITON_VLM_HANG_TIMEOUT_S"):
        sleeping._start_supervisor(sleeping.process.pid, {"TRITON_VLM_HANG_TIMEOUT_S": "never"})


def test_start_openai_front_hands_it_the_options_and_the_log(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[OpenAIOptions, Any]] = []

    class Front:
        def __init__(self, options: OpenAIOptions, log_file: Any = None) -> None:
            started.append((options, log_file))
            self.process: subprocess.Popen[bytes] | None = None

        def start(self) -> Front:
            return self

        def stop(self) -> None:
            pass

    # launcher.server imports it where it starts the front (openai.process imports the launcher package).
    monkeypatch.setattr("triton_vlm.openai.process.OpenAIFront", Front)
    options = OpenAIOptions(port=free_port())
    with open(tmp_path / "log", "w") as log_file:
        server = TritonServer(ServerOptions(work_dir=tmp_path, openai=options), log_file=log_file)
        server._start_openai_front(options)
        assert started == [(options, log_file)] and isinstance(server.openai_front, Front)
