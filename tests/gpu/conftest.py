"""Tests that need a CUDA device (compiled Triton kernels, CUDA graphs): skipped on machines without one, such as
CI's. Run them on a GPU host with ``pytest tests/gpu`` (bench/README.md has the command used on the lent H100)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)
