"""The engine path through Triton: token streaming from the <model>_stream companions, and the forwarding public
model."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.conftest import free_ports
from tests.integration.conftest import RunningServer

from triton_client import TritonVLMClient
from triton_vlm.client import parse_entities
from triton_vlm.direct import direct_runtime
from triton_vlm.errors import InvalidInputError
from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.models.generation import GenerationOutput
from triton_vlm.runtime import VLMRuntime

pytestmark = pytest.mark.integration

PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def llava() -> VLMRuntime:
    return direct_runtime("llava", tiny=True, device="cpu")


def _direct(runtime: VLMRuntime, image: bytes, prompt: str = PROMPT, **sampling: object) -> GenerationOutput:
    (out,) = runtime.generate([runtime.make_request(image, prompt, **sampling)])  # type: ignore[arg-type]
    assert not isinstance(out, Exception), out
    return out


def _expected(runtime: VLMRuntime, image: bytes, prompt: str = PROMPT, **sampling: object) -> str:
    return _direct(runtime, image, prompt, **sampling).text


def _engine_steps(triton: RunningServer, model: str, at_least: int) -> bool:
    """Whether ``model``'s engine ran ``at_least`` steps (so the engine served, not a batched loop); its
    counters are sampled every 0.25 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        steps = [float(line.split()[-1]) for line in triton.metrics().splitlines()
                 if line.startswith(f'triton_vlm_engine_steps_total{{model="{model}"')]
        if steps and steps[0] >= at_least:
            return True
        time.sleep(0.1)
    return False


def test_stream_pieces_join_to_the_direct_answer(triton: RunningServer, llava: VLMRuntime,
                                                 sample_image_bytes: bytes) -> None:
    client = TritonVLMClient(triton.http_url, grpc_url=triton.grpc_url)
    pieces = list(client.stream_pieces("llava", sample_image_bytes, PROMPT, max_tokens=12))
    client.close()
    assert len(pieces) >= 2, "tokens should arrive in several responses"
    assert pieces[-1].finish_reason in ("stop", "length") and all(not p.finish_reason for p in pieces[:-1])
    assert [p.generated_tokens for p in pieces] == sorted(p.generated_tokens for p in pieces)
    assert "".join(p.text for p in pieces) == _expected(llava, sample_image_bytes, max_tokens=12)


def test_chat_stream_pieces_join_to_the_chat_answer(triton: RunningServer, sample_image_bytes: bytes) -> None:
    """A chat streamed from llava_stream (``chat_stream_pieces``) answers as the public model's ``chat_result``."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
             {"role": "assistant", "content": "A house."}, {"role": "user", "content": "What colour is it?"}]
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        pieces = list(client.chat_stream_pieces("llava", turns, [sample_image_bytes], max_tokens=8))
        whole = client.chat_result("llava", turns, images=[sample_image_bytes], max_tokens=8)
    assert len(pieces) >= 2 and pieces[-1].finish_reason == whole.finish_reason
    assert "".join(p.text for p in pieces) == whole.text
    assert (pieces[-1].prompt_tokens, pieces[-1].generated_tokens) == (whole.prompt_tokens, whole.generated_tokens)


def test_concurrent_streams_equal_direct(triton: RunningServer, llava: VLMRuntime, sample_image_bytes: bytes) -> None:
    prompts = [f"{PROMPT} {'please ' * i}" for i in range(6)]
    client = TritonVLMClient(triton.grpc_url, protocol="grpc")
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda p: "".join(client.stream("llava", sample_image_bytes, p, max_tokens=10)),
                              prompts))
    client.close()
    assert texts == [_expected(llava, sample_image_bytes, p, max_tokens=10) for p in prompts]
    # The session server prepares llava_stream's requests on two workers (conftest.py): these went through them.
    assert "model llava_stream: engine ready in " in triton.log()
    assert "(requests prepared on 2 workers)" in triton.log()


def test_stream_errors_are_typed_and_the_stream_model_keeps_serving(triton: RunningServer,
                                                                    sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        with pytest.raises(InvalidInputError, match="^image: not a recognised image") as info:
            list(client.stream("llava", b"not an image", PROMPT))
        assert (info.value.code, info.value.param, info.value.model) == ("INVALID_ARG", "image", "llava_stream")
        with pytest.raises(InvalidInputError, match="exceeds the engine's context") as info:
            list(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=1024))
        assert info.value.param == "prompt"
        assert "".join(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=3))


def test_leaving_a_stream_early_cancels_it(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        stream: Iterator[str] = client.stream("llava", sample_image_bytes, PROMPT, max_tokens=900,
                                              ignore_eos=True)
        next(stream)
        stream.close()  # the generator's finally cancels the request
        assert "".join(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=3))


@pytest.fixture(scope="module")
def forwarding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """llava and kosmos2 served the GPU way: each public model forwards to its <model>_stream (the engine)."""
    http, grpc, metrics = free_ports()
    with open(tmp_path_factory.mktemp("forwarding") / "tritonserver.log", "w") as log:
        server = TritonServer(ServerOptions(models=("llava", "kosmos2"), tiny=True, engine="on",
                                            forwarder_instances=2, http_port=http, grpc_port=grpc,
                                            metrics_port=metrics), log_file=log)
        server.start()
        try:
            server.wait_until_ready(timeout=180)
            yield server
        finally:
            code = server.stop()
    assert code == 0


def test_forwarding_model_serves_plain_infer_from_the_engine(forwarding_server: TritonServer, llava: VLMRuntime,
                                                             sample_image_bytes: bytes) -> None:
    with urllib.request.urlopen(f"http://{forwarding_server.http_url}/v2/models/llava/config") as response:
        config = response.read().decode()
    assert '"forward_to"' in config and "KIND_CPU" in config
    images = [sample_image_bytes] * 6
    prompts = [f"{PROMPT} {'now ' * i}" for i in range(6)]
    client = TritonVLMClient(forwarding_server.http_url)
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda ip: client.infer("llava", ip[0], ip[1], max_tokens=10),
                               zip(images, prompts, strict=True)))
    with pytest.raises(InvalidInputError, match="^image: not a recognised image") as info:
        client.infer("llava", b"garbage", PROMPT)  # the engine's INVALID_ARG survives the hop as HTTP 400
    assert (info.value.code, info.value.param, info.value.model) == ("INVALID_ARG", "image", "llava")
    client.close()
    assert served == [_expected(llava, i, p, max_tokens=10) for i, p in zip(images, prompts, strict=True)]


def test_a_forwarded_request_is_not_held_up_by_longer_ones(forwarding_server: TritonServer,
                                                           sample_image_bytes: bytes) -> None:
    """Both forwarder instances get a long request; a short one sent next still comes back first. (The forwarder
    answers each request through its own response sender once the engine is done with it, and its instances
    take the next batch at once.)"""
    finished: list[str] = []
    client = TritonVLMClient(forwarding_server.http_url, timeout=120)

    def call(name: str, tokens: int) -> None:
        client.infer("llava", sample_image_bytes, PROMPT, max_tokens=tokens, ignore_eos=True)
        finished.append(name)

    with ThreadPoolExecutor(3) as pool:
        calls = []
        # Long enough that a 2-core machine busy with other work still tells the two apart (~3 s against ~0.1).
        for name, tokens in (("long 1", 800), ("long 2", 800), ("short", 2)):
            calls.append(pool.submit(call, name, tokens))
            time.sleep(0.15)  # each in a batch of its own
        for future in calls:
            future.result()
    client.close()
    assert finished[0] == "short", finished


def test_a_large_image_passes_through_the_forwarder_intact(forwarding_server: TritonServer, llava: VLMRuntime) -> None:
    """The forwarder sends each request on over gRPC: a 17 MB image (under the 20 MiB limit) must cross that hop
    whole, by gRPC and by HTTP, and get the answer the model gives it in-process."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2600, 2200, 3), dtype=np.uint8)).save(buffer, "PNG")
    image = buffer.getvalue()
    assert len(image) > 16 * 2**20
    expected = _expected(llava, image, max_tokens=4)
    for protocol, url in (("grpc", forwarding_server.grpc_url), ("http", forwarding_server.http_url)):
        with TritonVLMClient(url, protocol=protocol, timeout=120) as client:
            assert client.infer("llava", image, PROMPT, max_tokens=4) == expected, protocol


def test_a_forwarded_request_its_client_cancels_stops_in_the_engine(forwarding_server: TritonServer,
                                                                     sample_image_bytes: bytes) -> None:
    """A plain gRPC infer cancelled by its client: the forwarder cancels its stream to llava_stream, and the
    engine aborts the request (its KV slot free again) instead of generating 900 tokens for nobody. The engine's
    stub is paused (SIGSTOP) while the client cancels, so the request is certainly still running then: here the
    tiny engine makes 900 tokens in about half a second."""
    import os
    import queue
    import re
    import signal
    from pathlib import Path

    import tritonclient.grpc as grpcclient

    from triton_vlm._protocol.tensors import RequestFields, request_inputs
    from triton_vlm.launcher.procfs import live_stubs

    def log() -> str:
        return Path(forwarding_server.log_file.name).read_text(errors="replace")  # type: ignore[union-attr]

    def wait_for(pattern: re.Pattern[str], after: int) -> list:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = pattern.findall(log()[after:])
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {pattern.pattern!r} in the log: {log()[-3000:]}")

    short = request_inputs("grpc", RequestFields(sample_image_bytes, PROMPT))
    assert forwarding_server.process is not None
    (engine,) = [p for p, s in live_stubs(forwarding_server.process.pid).items() if s.model == "llava_stream"]
    client = grpcclient.InferenceServerClient(forwarding_server.grpc_url)
    assert client.infer("llava", short).as_numpy("generated_text") is not None  # warm: the model loaded
    mark = len(log())
    answers: queue.Queue = queue.Queue()
    long_answer = RequestFields(sample_image_bytes, PROMPT, max_tokens=900, ignore_eos=True)
    call = client.async_infer("llava", request_inputs("grpc", long_answer),
                              callback=lambda result, error: answers.put(error))
    time.sleep(0.1)
    os.kill(engine, signal.SIGSTOP)
    try:
        call.cancel()
        error = answers.get(timeout=30)
        assert error is not None and "CANCELLED" in str(error.status())
        wait_for(re.compile(re.escape("model 'llava': request cancelled by its client; cancelled in llava_stream too")),
                 mark)
    finally:
        os.kill(engine, signal.SIGCONT)
    aborted = re.compile(r"engine: request \S+ aborted after (\d+) tokens; its KV slots are free again \((\d+) of (\d+)")
    (tokens, free, total), = wait_for(aborted, mark)
    assert int(tokens) < 900 and free == total
    assert client.infer("llava", short).as_numpy("generated_text") is not None  # and it serves on
    client.close()


def test_forwarder_serves_again_after_the_engine_stub_dies(forwarding_server: TritonServer, llava: VLMRuntime,
                                                          sample_image_bytes: bytes) -> None:
    """The engine's stub killed: the supervisor reloads llava_stream and the forwarder in front of it."""
    import os
    import signal
    import time

    from triton_vlm.launcher.procfs import live_stubs

    assert forwarding_server.process is not None and forwarding_server.supervisor is not None
    (pid,) = [p for p, s in live_stubs(forwarding_server.process.pid).items() if s.model == "llava_stream"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(
            e.model == "llava" and e.ready_after_s is not None for e in forwarding_server.supervisor.recoveries()):
        time.sleep(0.2)
    assert [e.model for e in forwarding_server.supervisor.recoveries()] == ["llava_stream", "llava"]
    with TritonVLMClient(forwarding_server.http_url, timeout=60) as client:
        assert client.infer("llava", sample_image_bytes, PROMPT, max_tokens=5) == _expected(
            llava, sample_image_bytes, max_tokens=5)


# -- moondream2 on the engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moondream2() -> VLMRuntime:
    return direct_runtime("moondream2", tiny=True, device="cpu")


# smolvlm's tiny answer here holds a run of byte tokens that is no UTF-8 ("u" then a stray byte: all U+FFFD in a
# whole decode), which the stream holds back until the run ends (triton_vlm.detokenizer).
@pytest.mark.parametrize("model", ["moondream2", "kosmos2", "qwen2_vl", "llava_next", "smolvlm"])
def test_the_engine_streams_what_the_batched_model_answers(triton: RunningServer, sample_image_bytes: bytes,
                                                          model: str) -> None:
    # Not kosmos2's grounded prompt: the tiny random model answers that in location tokens, which clean up to "".
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        pieces = list(client.stream_pieces(model, sample_image_bytes, "What is this?", max_tokens=12,
                                           ignore_eos=True))
    expected = _direct(direct_runtime(model, tiny=True, device="cpu"), sample_image_bytes, "What is this?",
                       max_tokens=12, ignore_eos=True)
    assert len(pieces) >= 2 and pieces[-1].generated_tokens == 12 and expected.text
    assert "".join(p.text for p in pieces) == expected.text
    assert pieces[-1].entities == parse_entities(expected.extras.get("entities", "[]"))  # on the last piece
    assert _engine_steps(triton, f"{model}_stream", at_least=12)  # a prefill step and 11 decode steps


@pytest.mark.parametrize("task, prompt", [("caption:short", ""), ("detect", "face"), ("point", "face")])
def test_moondream2_tasks_the_engine_does_not_run_answer_in_one_piece(
        triton: RunningServer, moondream2: VLMRuntime, sample_image_bytes: bytes, task: str, prompt: str) -> None:
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        pieces = list(client.stream_pieces("moondream2", sample_image_bytes, prompt, max_tokens=8, task=task))
        assert "".join(client.stream("moondream2", sample_image_bytes, "hi", max_tokens=2))  # the engine serves on
    assert len(pieces) == 1 and pieces[0].finish_reason
    assert pieces[0].text == _expected(moondream2, sample_image_bytes, prompt, max_tokens=8, task=task)


# -- kosmos2 on the engine --------------------------------------------------------------------------------------
GROUNDED = "<grounding>An image of"


@pytest.fixture(scope="module")
def kosmos2() -> VLMRuntime:
    return direct_runtime("kosmos2", tiny=True, device="cpu")


def test_forwarded_kosmos2_answers_with_the_entities_the_batched_model_gives(
        forwarding_server: TritonServer, kosmos2: VLMRuntime, sample_image_bytes: bytes) -> None:
    with urllib.request.urlopen(f"http://{forwarding_server.http_url}/v2/models/kosmos2/config") as response:
        assert '"forward_to"' in response.read().decode()
    with TritonVLMClient(forwarding_server.http_url) as client:
        served = client.infer_result("kosmos2", sample_image_bytes, GROUNDED, max_tokens=10)
    expected = _direct(kosmos2, sample_image_bytes, GROUNDED, max_tokens=10)
    assert served.text == expected.text and served.generated_tokens == len(expected.token_ids)
    assert served.entities == parse_entities(expected.extras["entities"])
