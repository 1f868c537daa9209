"""Whole-answer requests whose clients give up stop in the engine, through the real server on a GPU host.

The public kosmos2 forwards each plain infer to ``kosmos2_stream`` and asks Triton once a second
(``backend/proxy.py``'s ``CANCEL_POLL_S``) whether the request's client cancelled it. Sixteen requests with a
client deadline far shorter than their answers must all time out at the client, each must be aborted in the engine
before its ``max_tokens``, every KV slot must be free afterwards, and the model must answer the next request.

Full-size kosmos2 (random fp16 weights): a tiny model on a GPU may finish all its tokens (at most ~1000 fit its
1024 positions) before the forwarder's first look, leaving nothing to cancel. On the H100, 16 requests of 600 tokens (1.6 s each) with a 0.5 s
deadline were aborted after 318-323 tokens (docs/reliability.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from triton_vlm.bench.workload import Workload
from triton_vlm.client import TritonVLMClient
from triton_vlm.errors import RequestTimeoutError, TritonVLMError

if TYPE_CHECKING:
    from tests.gpu.conftest import Served

REQUESTS = 16
MAX_TOKENS = 1000  # within the public model's max_tokens_limit (1024) and kosmos2's 2048 positions
ABORTED = re.compile(r"engine: request \S+ aborted after (\d+) tokens; its KV slots are free again \((\d+) of (\d+)")


@pytest.fixture(scope="module")
def kosmos2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from triton_vlm.bench.checkpoints import save_random_full_size

    path = save_random_full_size("kosmos2", tmp_path_factory.mktemp("kosmos2-random"), torch.device("cuda"))
    torch.cuda.empty_cache()  # the weights written, give their memory back to the server's engine
    return path


def test_requests_whose_clients_give_up_are_aborted_in_the_engine(
        serve: Callable[..., AbstractContextManager[Served]], kosmos2_checkpoint: Path) -> None:
    workload = Workload("kosmos2", prompt="What is in this image?", max_tokens=MAX_TOKENS)
    with serve(("kosmos2",), extra_env={"TRITON_VLM_KOSMOS2_LOCAL_PATH": str(kosmos2_checkpoint)}) as server:
        with TritonVLMClient(server.grpc_url, protocol="grpc", timeout=300) as patient:
            started = time.perf_counter()
            whole = patient.infer_result("kosmos2", workload.image(0), workload.prompt, max_tokens=MAX_TOKENS,
                                         ignore_eos=True)
            full_answer_s = time.perf_counter() - started
        assert whole.generated_tokens == MAX_TOKENS
        # Short enough that every request is still decoding when the forwarder next asks (within a second).
        deadline_s = min(0.5, full_answer_s / 4)
        mark = len(server.log())

        def give_up(index: int) -> str:
            with TritonVLMClient(server.grpc_url, protocol="grpc", timeout=deadline_s) as impatient:
                try:
                    impatient.infer_result("kosmos2", workload.image(index + 1), workload.prompt,
                                           max_tokens=MAX_TOKENS, ignore_eos=True)
                except TritonVLMError as exc:
                    return type(exc).__name__
            return "answered"

        with ThreadPoolExecutor(REQUESTS) as pool:
            outcomes = list(pool.map(give_up, range(REQUESTS)))
        assert outcomes == [RequestTimeoutError.__name__] * REQUESTS, f"full answer {full_answer_s:.2f} s"
        aborts: list[tuple[str, str, str]] = []
        wait_until = time.monotonic() + 30
        while len(aborts) < REQUESTS and time.monotonic() < wait_until:
            time.sleep(0.2)
            aborts = ABORTED.findall(server.log()[mark:])
        assert len(aborts) == REQUESTS, server.log()[mark:][-3000:]
        assert all(int(tokens) < MAX_TOKENS for tokens, _, _ in aborts), aborts
        _, free, total = aborts[-1]
        assert free == total  # every KV slot is free again
        with TritonVLMClient(server.grpc_url, protocol="grpc", timeout=120) as client:
            after = client.infer_result("kosmos2", workload.image(99), workload.prompt, max_tokens=4,
                                        ignore_eos=True)
        assert after.generated_tokens == 4
