"""``triton-vlm serve --preload`` where the weights are not here, for real (issue 25): the server does not start,
the reason is the last thing said, plainly, and no stub leaves a "Fatal Python error: Segmentation fault" report.

The models' code runs in Triton's Python stubs, which import triton_vlm from the installed environment (not from
PYTHONPATH): this test checks the checkout that environment was installed from. `make docker-test` checks the
same in the CPU image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT, free_ports

pytestmark = pytest.mark.integration


def test_preload_without_weights_fails_plainly(tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRITON_VLM_TINY": "0"}
    result = subprocess.run([sys.executable, "-m", "triton_vlm.cli.main", "serve", "--preload", "--models", "llava",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Fatal Python error" not in output
    last = result.stderr.strip().splitlines()[-3:]
    assert last[0].startswith("error: the server did not start: tritonserver exited"), last
    assert any(line.startswith("  model 'llava': cannot load weights") and "hf download" in line for line in last)
