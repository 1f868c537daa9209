"""Every command in the README's quick start runs as written (against the test server's ports)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from tests.conftest import ROOT
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.integration

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_names_the_two_commands() -> None:
    first = _blocks("bash")[0]
    assert "./triton_start.sh" in first and "make test" in first


def test_readme_start_flags_exist() -> None:
    """The flags the README lists for ./triton_start.sh (which runs ``triton-vlm start``) are real."""
    from triton_vlm.cli.main import _parser

    paragraph = README[README.index("`./triton_start.sh` serves"):README.index("## Quick start")]
    flags = set(re.findall(r"`(--[a-z-]+)", paragraph))
    assert {"--tiny", "--models", "--batch-delay-us", "--openai-port", "--mode", "--dry-run"} <= flags
    parser = _parser()
    switches = {"--tiny", "--preload", "--dry-run"}
    words = {"--mode": "embedded", "--host": "0.0.0.0", "--models": "llava"}
    for flag in sorted(flags):
        value = [] if flag in switches else [words.get(flag, "1")]
        parser.parse_args(["start", flag, *value])  # exits (SystemExit) on an unknown flag


def test_readme_cli_lines_run(triton: RunningServer, tmp_path: Path) -> None:
    lines = [line for block in _blocks("bash") for line in block.splitlines()
             if line.startswith(".venv/bin/triton-vlm")]
    assert len(lines) >= 2
    env = dict(os.environ, TRITON_VLM_URL=triton.http_url)
    for line in lines:
        command = shlex.split(line.split(" #")[0])
        if command[1] == "add-model":  # it writes a model directory: into a scratch repository, not the project's
            command += ["--model-repository", str(tmp_path)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        assert result.stdout.strip(), line
        if command[1] == "add-model":
            assert (tmp_path / command[2] / "config.pbtxt").is_file()


def test_readme_python_snippet_runs(triton: RunningServer) -> None:
    (snippet,) = _blocks("python")
    code = snippet.replace("localhost:8000", triton.http_url).replace("localhost:8001", triton.grpc_url)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().strip()
