"""The source tree passes ruff: pyflakes, bugbear, import order, pyupgrade and more (the rules: pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from .helpers import ROOT


def test_ruff_finds_no_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
