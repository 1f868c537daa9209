"""One command for one checkpoint, for real: ``triton-vlm serve DIR`` serves the tiny checkpoint directory of each
engine architecture (llava, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Idefics3) under a name, and ``./triton_start.sh
--model-id DIR`` a tiny llava under its derived name, with ``<name>_stream`` beside it, on a real tritonserver (free
loopback ports); the answers are what the same checkpoint answers in process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT, SAMPLE_IMAGE, free_ports

from triton_client import TritonVLMClient
from triton_vlm.direct import direct_runtime
from triton_vlm.launcher.checkpoint import served_name
from triton_vlm.tiny import ensure_tiny_checkpoint

pytestmark = pytest.mark.integration

PROMPT = "What is this?"


#: model (its --tiny checkpoint) -> (family, the architecture its config.json names).
CHECKPOINTS = {
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "smolvlm": ("smolvlm", "Idefics3ForConditionalGeneration"),
}


def _answer_in_process(model: str) -> str:
    """What ``model``'s tiny checkpoint (--tiny's) answers in this process."""
    runtime = direct_runtime(model, tiny=True, device="cpu")
    (output,) = runtime.generate([runtime.make_request(SAMPLE_IMAGE.read_bytes(), PROMPT, max_tokens=6)])
    return output.text  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def expected() -> str:
    """What the tiny llava answers in this process (the same checkpoint, --tiny's)."""
    return _answer_in_process("llava")


def _serve_and_ask(command: list[str], name: str, http: int, grpc: int, log_path: Path) -> tuple[str, str, str]:
    """Run ``command`` until it serves, ask ``name`` and stream from ``<name>_stream``, SIGTERM it; returns the
    answer, the streamed answer and the command's output (after checking it exited 0)."""
    env = dict(os.environ, TRITON_VLM_MODE="embedded", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   stdin=subprocess.DEVNULL)
    try:
        with TritonVLMClient(f"127.0.0.1:{http}", grpc_url=f"127.0.0.1:{grpc}") as client:
            client.wait_until_ready(timeout=180)
            answer = client.infer(name, SAMPLE_IMAGE, PROMPT, max_tokens=6)
            streamed = "".join(client.stream(name, SAMPLE_IMAGE, PROMPT, max_tokens=6))
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-3000:]
    return answer, streamed, output


@pytest.mark.parametrize("model", sorted(CHECKPOINTS))
def test_serve_a_checkpoint_directory_under_a_name(tmp_path: Path, model: str) -> None:
    family, architecture = CHECKPOINTS[model]
    name = f"my-{model}"
    http, grpc, metrics = free_ports()
    command = [sys.executable, "-m", "triton_vlm.cli.main", "serve", str(ensure_tiny_checkpoint(model)),
               "--name", name, "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    answer, streamed, output = _serve_and_ask(command, name, http, grpc, tmp_path / "serve.log")
    expected = _answer_in_process(model)
    assert answer == expected and streamed.strip() == expected
    assert f"ready: models {name}, {name}_stream" in output
    assert f"serving {name} and {name}_stream from " in output
    assert f"(family {family}; architecture {architecture})" in output


def test_start_script_model_id_serves_it_under_its_derived_name(tmp_path: Path, expected: str) -> None:
    http, grpc, metrics = free_ports()
    checkpoint = ensure_tiny_checkpoint("llava")
    name = served_name(str(checkpoint))  # the directory's name, e.g. llava-v2
    command = [str(ROOT / "triton_start.sh"), "--model-id", str(checkpoint), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    answer, streamed, output = _serve_and_ask(command, name, http, grpc, tmp_path / "start.log")
    assert answer == expected and streamed.strip() == expected
    assert f"ready: models {name}, {name}_stream" in output
