"""The tiny llava and kosmos2 through the real tritonserver on a GPU host, as `triton-vlm serve` runs them there:
KIND_GPU instances, the public models forwarding whole answers to their ``<model>_stream`` engines, a stream, a
grounded kosmos2 answer, and Triton's GPU metrics beside triton-vlm's own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pytest

from triton_vlm.bench.workload import Workload
from triton_vlm.client import TritonVLMClient
from triton_vlm.observability.scrape import fetch_metrics, parse_metrics, value_of

if TYPE_CHECKING:
    from tests.gpu.conftest import Served

MODELS = ("llava", "kosmos2")
ENGINES = ("llava_stream", "kosmos2_stream")
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(serve: Callable[..., AbstractContextManager[Served]]) -> Iterator[Served]:
    # The launcher's defaults on a GPU host (instance kind and engine "auto"), as a user gets them.
    with serve(MODELS, tiny=True) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: Served) -> Iterator[TritonVLMClient]:
    with TritonVLMClient(server.grpc_url, protocol="grpc", timeout=120) as client:  # GPU hosts lack gevent (HTTP)
        yield client


@pytest.fixture(scope="module")
def image() -> bytes:
    return Workload(model="llava").image(0)


def metric(server: Served, name: str, **labels: str) -> float:
    """The value of one sample of ``name`` with ``labels`` now (0 where there is none yet)."""
    return value_of(parse_metrics(fetch_metrics(server.metrics_url)), name, **labels) or 0.0


def metric_reaching(server: Served, name: str, target: float, **labels: str) -> float:
    """``name``'s value once it reaches ``target``, or after 10 s: the engine's counters are brought up to date by
    the response thread every 0.25 s while requests are open, and once after."""
    deadline = time.monotonic() + 10
    while (value := metric(server, name, **labels)) < target and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_the_engines_run_on_the_gpu_and_the_public_models_forward_to_them(client: TritonVLMClient) -> None:
    ready = {m["name"] for m in client.list_models() if m.get("state", "READY") == "READY"}
    assert ready >= {*MODELS, *ENGINES}
    for model, engine in zip(MODELS, ENGINES, strict=True):
        assert client.model_config(model)["parameters"]["forward_to"]["string_value"] == engine
        kinds = {group.get("kind") for group in client.model_config(engine)["instance_group"]}
        assert kinds == {"KIND_GPU"}, (engine, kinds)


def test_plain_infer_on_the_public_llava_is_answered_by_its_engine(server: Served, client: TritonVLMClient,
                                                                   image: bytes) -> None:
    decoded = "triton_vlm_engine_tokens_total"
    before = metric(server, decoded, model="llava_stream", phase="decode")
    for _ in range(3):
        result = client.infer_result("llava", image, "What is in this image?", max_tokens=MAX_TOKENS,
                                     ignore_eos=True)
        assert (result.generated_tokens, result.finish_reason) == (MAX_TOKENS, "length")
    expected = before + 3 * (MAX_TOKENS - 1)  # the first token of each came from its prefill
    assert metric_reaching(server, decoded, expected, model="llava_stream", phase="decode") == expected


def test_llava_streams_its_answer_piece_by_piece(client: TritonVLMClient, image: bytes) -> None:
    pieces = list(client.stream_pieces("llava", image, "Describe it.", max_tokens=MAX_TOKENS, ignore_eos=True))
    assert len(pieces) > 1
    assert (pieces[-1].generated_tokens, pieces[-1].finish_reason) == (MAX_TOKENS, "length")
    assert [p.generated_tokens for p in pieces] == sorted(p.generated_tokens for p in pieces)


def test_kosmos2_answers_a_grounded_prompt_with_boxes_inside_the_image(client: TritonVLMClient,
                                                                       image: bytes) -> None:
    result = client.infer_result("kosmos2", image, "<grounding> An image of", max_tokens=16)
    assert 0 < result.generated_tokens <= 16
    for entity in result.entities:  # random tiny weights: any number of entities, each box normalized
        for box in entity.boxes:
            assert 0 <= box.x_min <= box.x_max <= 1 and 0 <= box.y_min <= box.y_max <= 1, entity


def test_triton_exports_gpu_metrics_beside_triton_vlms(server: Served, client: TritonVLMClient,
                                                       image: bytes) -> None:
    client.infer_result("kosmos2", image, "An image of", max_tokens=4, ignore_eos=True)
    samples = parse_metrics(fetch_metrics(server.metrics_url))

    def values(name: str, **labels: Any) -> list[float]:
        return [s.value for s in samples if s.name == name and all(s.label(k) == v for k, v in labels.items())]

    assert values("nv_gpu_utilization") and all(0 <= v <= 1 for v in values("nv_gpu_utilization"))
    assert values("nv_gpu_memory_used_bytes") and max(values("nv_gpu_memory_used_bytes")) > 0
    for engine in ENGINES:  # the forwarding public models keep no metrics of their own but Triton's
        assert values("triton_vlm_model_loaded", model=engine) == [1.0], engine
    assert (value_of(samples, "nv_inference_request_success", model="kosmos2") or 0) >= 1
    assert metric_reaching(server, "triton_vlm_engine_steps_total", 1, model="kosmos2_stream") >= 1
    assert metric_reaching(server, "triton_vlm_time_to_first_token_seconds_count", 1, model="kosmos2_stream") >= 1
