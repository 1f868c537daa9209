"""notebooks/triton_inference.ipynb runs top to bottom (nbclient, a real kernel) against the session's server, so
it never rots: every model answers, moondream2's boxes are drawn, served equals direct."""

from __future__ import annotations

import os
import time

import pytest
from tests.conftest import ROOT
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.integration

NOTEBOOK = ROOT / "notebooks" / "triton_inference.ipynb"


def test_notebook_runs_against_the_server(triton: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: the session's server, and its tiny-checkpoint cache.
    monkeypatch.setenv("TRITON_VLM_URL", triton.http_url)
    monkeypatch.setenv("TRITON_VLM_GRPC_URL", triton.grpc_url)
    monkeypatch.setenv("TRITON_VLM_METRICS_URL", triton.server.metrics_url)
    monkeypatch.setenv("TRITON_VLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TRITON_VLM_NOTEBOOK_REPEATS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: plots become PNG outputs
    assert os.environ["TRITON_VLM_CACHE"]
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.monotonic()
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    seconds = time.monotonic() - started
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    markdown = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert f"using the server at {triton.http_url}" in text
    assert "triton 2.51.0  live, ready" in text
    for model in ("llava", "kosmos2", "moondream2"):
        assert f"| {model} |" in markdown
        assert f"| {model} | " in markdown.split("| served (median) |")[1]
    assert "| NO |" not in markdown  # served == direct for every model
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the boxes and the latency plot
    assert "mean TTFT" in text
    assert seconds < 60, f"the notebook took {seconds:.0f}s"


def test_notebook_is_valid_and_starts_a_tiny_server_without_one() -> None:
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    source = "\n".join(cell.source for cell in notebook.cells)
    assert "TritonServer(ServerOptions(models=tuple(MODELS), tiny=True" in source
    assert "if client.is_ready():" in source and "server.stop()" in source
    assert 'json.loads(answers[("moondream2", "house", "detect")].text)' in source
