"""deploy/docker-test.sh (`make docker-test`) where no Docker engine can run: it says so and exits 77 (skipped),
never 0. Where an engine runs it builds and starts the CPU image for real (docs/deployment.md); that part runs in
.ci/run, not here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "deploy" / "docker-test.sh"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_skips_without_an_engine_and_never_passes(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "docker", "exit 1")  # no daemon answers
    _fake(bin_dir, "dockerd", "echo 'level=fatal msg=\"no cgroups here\"' >&2; exit 1")
    outcome = tmp_path / "result"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
           "DOCKER_TEST_RESULT": str(outcome)}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 77, result.stdout + result.stderr
    assert outcome.read_text() == "77\n"  # what .ci/run reads: through make, every failure is exit 2
    assert "SKIPPED (not a pass)" in result.stderr
    assert "PASSED" not in result.stdout + result.stderr
    if os.getuid() == 0:
        assert "no cgroups here" in result.stderr  # the reason, from dockerd's own log
    assert not list(tmp_path.glob("triton-vlm-docker-test.*"))  # its work dir is gone


def test_make_target_and_ci() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "docker-test: install\n\tPYTHON=$(abspath $(PY)) bash deploy/docker-test.sh" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "DOCKER_TEST_RESULT=$result timeout --kill-after=60 2400 make docker-test" in ci
    assert ci.index("make test") < ci.index("make docker-test")
    assert os.access(SCRIPT, os.X_OK)
