"""Tests that need a CUDA device (compiled Triton kernels, CUDA graphs, KIND_GPU model instances): skipped on
machines without one, such as CI's. The ones that serve through the real tritonserver also skip where no Triton
server tree (or no Triton client) is found. On a GPU host: ``bash bench/gpu_tests.sh`` (bench/README.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import free_ports, server_exit_report

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@dataclass
class Served:
    """A tritonserver a test started, and the file its log goes to."""

    server: Any  # triton_vlm.launcher.TritonServer
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return str(self.server.grpc_url)

    @property
    def metrics_url(self) -> str:
        return str(self.server.metrics_url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def triton_tree() -> Path:
    """The Triton server tree the launcher will run (the wheel's, or ``$TRITON_VLM_TRITON_HOME``); skips the test
    where there is none, or no Triton client to talk to it."""
    pytest.importorskip("tritonclient.grpc", reason="needs Triton's client (bench/gpu_env.sh installs it)")
    from triton_vlm.launcher.distribution import LauncherError, find_distribution

    try:
        return find_distribution().root
    except LauncherError as exc:
        pytest.skip(f"no Triton server tree: {exc}")


@pytest.fixture(scope="session")
def serve(triton_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., AbstractContextManager[Served]]:
    """``serve(models, **options)``: a context manager that starts a tritonserver for ``models`` (preloaded, free
    loopback ports, further :class:`~triton_vlm.launcher.ServerOptions` as keywords), waits until it is ready,
    and stops it on exit, checking that it exited cleanly."""
    from triton_vlm.launcher import ServerOptions, TritonServer

    @contextlib.contextmanager
    def start(models: tuple[str, ...], **options: Any) -> Iterator[Served]:
        log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
        http, grpc, metrics = free_ports()
        with open(log_path, "w") as log_file:
            server = TritonServer(ServerOptions(models=models, preload=True, http_port=http, grpc_port=grpc,
                                                metrics_port=metrics, **options), log_file=log_file)
            server.start()
            try:
                server.wait_until_ready(timeout=900)
                yield Served(server, log_path)
            finally:
                code = server.stop()
        assert code == 0, server_exit_report(log_path, code)
    return start
