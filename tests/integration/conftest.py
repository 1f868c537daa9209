"""One real tritonserver (tiny weights, free loopback ports) and one OpenAI front in front of it, shared by the
whole integration session."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port, free_ports, server_exit_report

from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.openai import OpenAIOptions
from triton_vlm.openai.config import MiB

# smolvlm: Idefics3 / SmolVLM (a tiny Idefics3 with image splitting under --tiny).
SERVED_MODELS = ("llava", "kosmos2", "moondream2", "qwen2_vl", "smolvlm", "llava_next", "llava_onevision")
WORKING_MODELS = ("llava", "kosmos2", "moondream2", "qwen2_vl", "smolvlm", "llava_next", "llava_onevision")
#: The engine models the launcher derives from them and serves beside them (decoupled, streaming).
ENGINE_MODELS = ("kosmos2_stream", "llava_stream", "moondream2_stream", "qwen2_vl_stream", "smolvlm_stream",
                 "llava_next_stream", "llava_onevision_stream")
#: A typical prompt for each working model.
PROMPTS = {"llava": "What is in this image?", "kosmos2": "<grounding>An image of",
           "moondream2": "What is in this image?", "qwen2_vl": "What is in this image?",
           "smolvlm": "What is in this image?", "llava_next": "What is in this image?",
           "llava_onevision": "What is in this image?"}


@dataclass
class ServerHandle:
    """A tritonserver a test session started, and the file its log goes to."""

    server: TritonServer
    log_path: Path

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class RunningServer(ServerHandle):
    startup_metrics: str  # scraped before any inference request

    def metrics(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as response:
            return response.read().decode()


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    http, grpc, metrics = free_ports()
    # DEBUG: one log line per request (tests/integration/test_observability.py reads them). llava_stream prepares
    # its requests on two workers (the pool of a host of 8+ cores); the other engine models on the service's thread
    # (what this 2-core machine's default gives).
    options = ServerOptions(models=SERVED_MODELS, tiny=True, http_port=http, grpc_port=grpc, metrics_port=metrics,
                            extra_env={"TRITON_VLM_LOG_LEVEL": "DEBUG", "TRITON_VLM_LLAVA_STREAM_PREPARE_WORKERS": "2"})
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
    assert code == 0, server_exit_report(log_path, code)


# -- the OpenAI front (test_openai.py, test_playground.py) ---------------------------------------------------------
API_KEY = "sk-test-" + "0123456789abcdef"


@dataclass
class Front:
    options: OpenAIOptions
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.options.base_url

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def client(self, api_key: str = API_KEY) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def front(triton: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """The front process, started the way the launcher starts it: an API key, and small body/image limits so the
    413 paths are cheap to reach."""
    from triton_vlm.openai.process import OpenAIFront

    options = OpenAIOptions(port=free_port(), triton_grpc_url=triton.grpc_url, api_keys=(API_KEY,),
                            max_body_bytes=2 * MiB, max_image_bytes=1 * MiB, cors_origins=("https://ui.example",))
    log_path = tmp_path_factory.mktemp("openai") / "front.log"
    with open(log_path, "w") as log_file:
        process = OpenAIFront(options, log_file=log_file).start()
        try:
            process.wait_until_ready(timeout=60)
            yield Front(options, log_path)
        finally:
            code = process.stop()
    assert code == 0, log_path.read_text()[-3000:]
    assert API_KEY not in log_path.read_text()
