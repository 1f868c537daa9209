"""One real tritonserver (tiny weights, free loopback ports) shared by the whole integration session."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_ports
from triton_vlm.launcher import ServerOptions, TritonServer

# smolvlm: the auto family (a directory written by `triton-vlm add-model`), a tiny Idefics3 under --tiny.
SERVED_MODELS = ("llava", "kosmos2", "moondream2", "smolvlm")
WORKING_MODELS = ("llava", "kosmos2", "moondream2", "smolvlm")
#: A typical prompt for each working model.
PROMPTS = {"llava": "What is in this image?", "kosmos2": "<grounding>An image of",
           "moondream2": "What is in this image?", "smolvlm": "What is in this image?"}


@dataclass
class RunningServer:
    server: TritonServer
    log_path: Path
    startup_metrics: str  # scraped before any inference request

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def metrics(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    http, grpc, metrics = free_ports()
    # DEBUG: one log line per request (tests/integration/test_observability.py reads them).
    options = ServerOptions(models=SERVED_MODELS, tiny=True, http_port=http, grpc_port=grpc, metrics_port=metrics,
                            extra_env={"TRITON_VLM_LOG_LEVEL": "DEBUG"})
    with open(log_path, "w") as log_file:
        server = TritonServer(options, log_file=log_file)
        server.start()
        try:
            server.wait_until_ready(timeout=180)
            with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
                startup = response.read().decode()
            yield RunningServer(server, log_path, startup)
        finally:
            code = server.stop()
    assert code == 0, f"tritonserver exited with {code}; log:\n{log_path.read_text()[-3000:]}"
