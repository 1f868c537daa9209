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
