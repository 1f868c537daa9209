"""End to end through the real tritonserver: endpoints, answers, parity with direct inference, batching,
metrics, lazy loading and per-request errors."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image
from tests.integration.conftest import ENGINE_MODELS, PROMPTS, SERVED_MODELS, WORKING_MODELS, RunningServer

from triton_client import TritonVLMClient
from triton_vlm.direct import direct_runtime
from triton_vlm.errors import InvalidInputError, UnknownModelError
from triton_vlm.runtime import VLMRuntime

T = TypeVar("T")

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def _stats(triton: RunningServer, model: str) -> dict:
    _, body = _get(f"http://{triton.http_url}/v2/models/{model}/stats")
    return json.loads(body)["model_stats"][0]


#: The blocker's length: most of each tiny model's context (moondream2's is 512 positions). On this machine they
#: make 1800-3300 tok/s, so 300 tokens were over in ~0.1-0.17 s: sometimes before the burst arrived.
BLOCKER_TOKENS = {"llava": 900, "kosmos2": 900, "smolvlm": 1000, "moondream2": 480, "qwen2_vl": 900, "llava_next": 800,
                  "llava_onevision": 800}


def batched_burst(triton: RunningServer, model: str, image: bytes, send: Callable[[], T],
                  requests: int) -> tuple[T, int, int]:
    """``send()``, a burst of concurrent requests to ``model`` (``requests`` of them answered), while one long
    request keeps the model's instance busy, so the burst queues behind it and goes in batches: the batchers wait
    for no one (max_queue_delay_microseconds is 0), so otherwise batching depends on how the requests happen to
    arrive. Tries again (up to three times) where the long request ended within 30 ms of the burst's start, too
    soon for the burst to have queued behind it. Returns ``send``'s result and the inferences and executions
    Triton counted, the long request included."""
    for _ in range(3):
        before = _settled_stats(triton, model)
        with TritonVLMClient(triton.http_url) as client, ThreadPoolExecutor(1) as pool:
            def block() -> float:
                client.infer(model, image, PROMPTS[model], max_tokens=BLOCKER_TOKENS[model], ignore_eos=True)
                return time.monotonic()

            blocker = pool.submit(block)
            time.sleep(0.02)  # the long request reaches the instance first
            burst_began = time.monotonic()
            result = send()
            blocker_ended = blocker.result()
        deadline = time.monotonic() + 10  # Triton counts a request just after answering it
        while (after := _stats(triton, model))["inference_count"] - before["inference_count"] < requests + 1:
            assert time.monotonic() < deadline, (before, after)
            time.sleep(0.1)
        if blocker_ended - burst_began > 0.03:  # a burst's requests leave within a few ms of each other
            break
    else:
        pytest.fail(f"{model}: the long request kept ending within 30 ms of the burst: nothing to queue behind")
    return (result, after["inference_count"] - before["inference_count"],
            after["execution_count"] - before["execution_count"])


def _settled_stats(triton: RunningServer, model: str) -> dict:
    """The model's statistics once they stop moving (Triton counts a request just after answering it)."""
    before = _stats(triton, model)
    while True:
        time.sleep(0.1)
        settled = _stats(triton, model)
        if settled == before:
            return settled
        before = settled


@pytest.fixture(scope="module")
def direct() -> dict[str, VLMRuntime]:
    return {m: direct_runtime(m, tiny=True, device="cpu") for m in WORKING_MODELS}


def _direct_text(runtime: VLMRuntime, image: bytes, prompt: str, **sampling: object) -> str:
    (out,) = runtime.generate([runtime.make_request(image, prompt, **sampling)])  # type: ignore[arg-type]
    assert not isinstance(out, Exception), out
    return out.text


def _images(count: int) -> list[bytes]:
    """Distinct PNGs of different sizes (ragged batch)."""
    import io

    rng = np.random.default_rng(7)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(24 + 8 * i, 40 + 4 * i, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


# -- endpoints --------------------------------------------------------------------------------------------
def test_health_endpoints(triton: RunningServer) -> None:
    assert _get(f"http://{triton.http_url}/v2/health/live")[0] == 200
    assert _get(f"http://{triton.http_url}/v2/health/ready")[0] == 200
    for model in SERVED_MODELS:
        assert _get(f"http://{triton.http_url}/v2/models/{model}/ready")[0] == 200


def test_model_list_over_http_and_grpc(triton: RunningServer) -> None:
    for protocol, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
        with TritonVLMClient(url, protocol=protocol) as client:  # type: ignore[arg-type]
            models = {m["name"]: m["state"] for m in client.list_models()}
            # <m>_stream comes with m: the engine-backed, streaming companion.
            assert models == {m: "READY" for m in (*SERVED_MODELS, *ENGINE_MODELS)}
            assert client.is_ready() and client.is_ready("llava")


def test_model_config_served_with_batching(triton: RunningServer) -> None:
    _, body = _get(f"http://{triton.http_url}/v2/models/llava/config")
    config = json.loads(body)
    assert config["max_batch_size"] > 0
    assert "dynamic_batching" in config
    assert config["instance_group"][0]["kind"] == "KIND_CPU"  # rewritten from KIND_GPU: this host has none
    names = {i["name"]: i for i in config["input"]}
    assert names["image"]["data_type"] == "TYPE_UINT8" and names["image"]["allow_ragged_batch"]
    assert names["prompt"]["data_type"] == "TYPE_STRING"


# -- lazy loading -----------------------------------------------------------------------------------------
def test_weights_load_lazily_on_first_request(triton: RunningServer, sample_image_bytes: bytes) -> None:
    for model in WORKING_MODELS:
        assert f'triton_vlm_model_loaded{{model="{model}"}} 0' in triton.startup_metrics
    assert "loading weights on first use" not in triton.log().split("successfully loaded 'llava'")[0]
    with TritonVLMClient(triton.http_url) as client:
        for model in WORKING_MODELS:
            client.infer(model, sample_image_bytes, PROMPTS[model], max_tokens=2)
    metrics = triton.metrics()
    for model in WORKING_MODELS:
        assert f'triton_vlm_model_loaded{{model="{model}"}} 1' in metrics
        seconds = float(re.search(rf'triton_vlm_model_load_seconds{{model="{model}"}} ([0-9.e+-]+)', metrics)[1])
        assert seconds > 0
    assert re.search(r"loaded model llava \(llava from .*\) on cpu as float32 in [0-9.]+s", triton.log())


# -- answers and parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", WORKING_MODELS)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_equals_direct_single(triton: RunningServer, direct: dict[str, VLMRuntime], model: str,
                                     protocol: str, sample_image_bytes: bytes) -> None:
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with TritonVLMClient(url, protocol=protocol) as client:  # type: ignore[arg-type]
        result = client.infer_result(model, sample_image_bytes, PROMPTS[model], max_tokens=MAX_TOKENS)
    expected = _direct_text(direct[model], sample_image_bytes, PROMPTS[model], max_tokens=MAX_TOKENS)
    assert result.text == expected
    assert 0 < result.generated_tokens <= MAX_TOKENS
    assert result.prompt_tokens > 0
    assert result.finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", WORKING_MODELS)
def test_client_accepts_path_pil_and_array(triton: RunningServer, model: str) -> None:
    from tests.conftest import SAMPLE_IMAGE

    pil = Image.open(SAMPLE_IMAGE).convert("RGB")
    with TritonVLMClient(triton.http_url) as client:
        by_path = client.infer(model, SAMPLE_IMAGE, PROMPTS[model], max_tokens=6)
        by_str = client.infer(model, str(SAMPLE_IMAGE), PROMPTS[model], max_tokens=6)
        by_pil = client.infer(model, pil, PROMPTS[model], max_tokens=6)
        by_array = client.infer(model, np.asarray(pil), PROMPTS[model], max_tokens=6)
    assert by_path == by_str
    assert by_pil == by_array  # same pixels, both sent as PNG


@pytest.mark.parametrize("model", WORKING_MODELS)
def test_concurrent_requests_are_batched_and_equal_direct(triton: RunningServer, direct: dict[str, VLMRuntime],
                                                          model: str) -> None:
    images = _images(8)
    prompts = [f"{PROMPTS[model]} {'really ' * i}" for i in range(8)]  # different lengths -> padding

    def burst() -> list[str]:
        with TritonVLMClient(triton.http_url) as client, ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda ip: client.infer(model, ip[0], ip[1], max_tokens=MAX_TOKENS),
                                 zip(images, prompts, strict=True)))

    served, inferences, executions = batched_burst(triton, model, images[0], burst, requests=8)
    expected = [_direct_text(direct[model], i, p, max_tokens=MAX_TOKENS) for i, p in zip(images, prompts, strict=True)]
    assert served == expected
    assert inferences == 9  # the burst and the long request before it
    assert executions < inferences, f"no batching: {executions} executions for {inferences} requests"


def test_seeded_sampling_is_reproducible(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client:
        runs = [client.infer("llava", sample_image_bytes, "Describe it.", max_tokens=10, temperature=1.0,
                             top_p=0.9, seed=42) for _ in range(2)]
        other = client.infer("llava", sample_image_bytes, "Describe it.", max_tokens=10, temperature=1.0,
                             top_p=0.9, seed=43)
        greedy = client.infer("llava", sample_image_bytes, "Describe it.", max_tokens=10)
    assert runs[0] == runs[1]
    assert len({runs[0], other, greedy}) >= 2


# -- metrics ----------------------------------------------------------------------------------------------
def test_prometheus_metrics(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client:
        client.infer("llava", sample_image_bytes, "What is this?", max_tokens=3)
    metrics = triton.metrics()
    success = re.search(r'nv_inference_request_success{model="llava",version="1"} (\d+)', metrics)
    assert success and int(success[1]) >= 1
    generated = re.search(r'triton_vlm_generated_tokens_total{model="llava"} (\d+)', metrics)
    assert generated and int(generated[1]) >= 3
    # Metrics live on the metrics port, not on the HTTP port.
    with pytest.raises(urllib.error.HTTPError):
        _get(f"http://{triton.http_url}/metrics")


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_image_gets_clear_error_and_server_keeps_serving(triton: RunningServer, protocol: str,
                                                             sample_image_bytes: bytes) -> None:
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with TritonVLMClient(url, protocol=protocol) as client:  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="not a recognised image"):
            client.infer("llava", b"this is not an image", "What is this?")
        with pytest.raises(InvalidInputError, match="prompt: empty"):
            client.infer("llava", sample_image_bytes, "   ")
        with pytest.raises(InvalidInputError, match="max_tokens"):
            client.infer("llava", sample_image_bytes, "What?", max_tokens=100000)
        assert client.infer("llava", sample_image_bytes, "What is this?", max_tokens=3)
    assert _get(f"http://{triton.http_url}/v2/health/ready")[0] == 200


def test_one_bad_request_in_a_batch_fails_alone(triton: RunningServer, direct: dict[str, VLMRuntime]) -> None:
    images = _images(8)
    images[3] = images[3][: len(images[3]) // 2]  # truncated PNG

    def burst() -> list[str | Exception]:
        def call(image: bytes) -> str | Exception:
            try:
                return client.infer("llava", image, "What is this?", max_tokens=MAX_TOKENS)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                return exc

        with TritonVLMClient(triton.http_url) as client, ThreadPoolExecutor(8) as pool:
            return list(pool.map(call, images))

    # Triton counts successful inferences only: 7 of the 8.
    results, inferences, executions = batched_burst(triton, "llava", images[0], burst, requests=7)
    assert isinstance(results[3], InvalidInputError) and "truncated" in str(results[3])
    for i, result in enumerate(results):
        if i != 3:
            assert result == _direct_text(direct["llava"], images[i], "What is this?", max_tokens=MAX_TOKENS)
    # The bad request fails alone, inside a batch: the burst ran in fewer executions than requests.
    assert executions < inferences, f"no batching: {executions} executions for {inferences} requests"


def test_unknown_model(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client, pytest.raises(UnknownModelError, match="nonexistent"):
        client.infer("nonexistent", sample_image_bytes, "hi")


def test_moondream2_skills_served_equal_direct(triton: RunningServer, direct: dict[str, VLMRuntime],
                                               sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.http_url) as client:
        for task, prompt in (("caption:short", ""), ("detect", "house"), ("point", "tree")):
            served = client.infer("moondream2", sample_image_bytes, prompt, task=task, max_tokens=8)
            runtime = direct["moondream2"]
            (expected,) = runtime.generate([runtime.make_request(sample_image_bytes, prompt, task=task,
                                                                 max_tokens=8)])
            assert served == expected.text  # type: ignore[union-attr]
            if task in ("detect", "point"):
                answer = json.loads(served)
                assert isinstance(answer, dict)
        with pytest.raises(InvalidInputError, match="task"):
            client.infer("llava", sample_image_bytes, "x", task="detect")


def test_a_cancelled_request_stops_generating_and_the_model_serves_on(triton: RunningServer,
                                                                       sample_image_bytes: bytes) -> None:
    """gRPC cancellation reaches the batched loop (Triton's ``request.is_cancelled``): the request's work stops
    early instead of running to ``max_tokens``, and the instance is free for the next request."""
    import queue

    import tritonclient.grpc as grpcclient

    from triton_vlm._protocol.tensors import RequestFields, request_inputs

    def inputs(max_tokens: int) -> list:
        return request_inputs("grpc", RequestFields(sample_image_bytes, "Describe it.", max_tokens=max_tokens,
                                                    ignore_eos=True))

    pattern = re.compile(r"INFO model 'llava': request cancelled by its client (after (\d+) tokens|before it ran)")
    before = len(pattern.findall(triton.log()))
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    answers: queue.Queue = queue.Queue()
    call = client.async_infer("llava", inputs(960), callback=lambda result, error: answers.put(error))
    time.sleep(0.15)  # the whole answer takes several times longer on these machines
    call.cancel()
    error = answers.get(timeout=60)
    assert error is not None and "CANCELLED" in str(error.status())
    deadline = time.monotonic() + 30
    while len(pattern.findall(triton.log())) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    found = pattern.findall(triton.log())[before:]
    assert len(found) == 1, triton.log()[-2000:]
    (_, tokens), = found
    assert tokens == "" or int(tokens) < 960
    result = client.infer("llava", inputs(3))
    assert int(result.as_numpy("generated_tokens").reshape(-1)[0]) == 3
    client.close()
