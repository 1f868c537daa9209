"""Shared test set-up: one tiny-checkpoint cache per test session, free loopback ports."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = ROOT / "test_images" / "sample_image.jpg"

# Before anything imports triton_vlm: tiny checkpoints go to a per-session cache, never the user's.
if "TRITON_VLM_CACHE" not in os.environ:
    os.environ["TRITON_VLM_CACHE"] = tempfile.mkdtemp(prefix="triton-vlm-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int = 3) -> tuple[int, ...]:
    """``count`` distinct free loopback ports, ascending (HTTP, gRPC, metrics)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return tuple(sorted(ports))


@pytest.fixture(scope="session")
def sample_image_bytes() -> bytes:
    return SAMPLE_IMAGE.read_bytes()


def server_exit_report(log_path: Path, code: int) -> str:
    """Why a test tritonserver did not exit 0: the models Triton loaded whose ``finalize`` never said "model X
    unloaded" (our backends' line), those among them whose finalize began ("model X: unloading"), and the log's
    last lines without Triton's once-a-second shutdown countdown (which alone would fill the tail). A stop that
    hung has the live stubs' stacks there (the launcher asks for them)."""
    import re

    text = log_path.read_text(errors="replace")
    loaded = set(re.findall(r"successfully loaded '([^']+)'", text))
    unloaded = set(re.findall(r"model (\S+) unloaded", text))
    began = set(re.findall(r"model (\S+): unloading", text))
    lines = [line for line in text.splitlines() if "in-flight non-inference requests" not in line]
    return (f"tritonserver exited with {code}; loaded, never finalized: {sorted(loaded - unloaded) or 'none'}"
            f" (finalize began: {sorted((loaded - unloaded) & began) or 'none'});"
            f" log (countdown left out):\n" + "\n".join(lines[-150:]))
