"""The client's retries (only while unreachable or UNAVAILABLE), timeouts, infer_many and the asyncio client,
against a scripted stand-in for Triton's HTTP API (tests/unit/fake_triton.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from triton_vlm.client import AsyncTritonVLMClient, InferenceResult, RetryPolicy, TritonVLMClient
from triton_vlm.errors import (
    ConnectionLostError,
    InvalidInputError,
    ModelUnavailableError,
    RequestTimeoutError,
    ServerUnreachableError,
    TritonVLMError,
)

from .fake_triton import HANG_UP, FakeTriton, answer
from .helpers import free_port, image_bytes

FAST = RetryPolicy(attempts=30, backoff=0.05, multiplier=1.5, max_backoff=0.2, deadline=20)
IMAGE = image_bytes(4, 4)


@pytest.fixture
def port() -> int:
    return free_port()


def _fake(port: int, **kwargs: object) -> FakeTriton:
    return FakeTriton(port, **kwargs)  # type: ignore[arg-type]


# -- RetryPolicy ----------------------------------------------------------------------------------------------
def test_policy_coercion_and_delays() -> None:
    assert RetryPolicy.coerce(None).attempts == 1 and RetryPolicy.coerce(False).attempts == 1
    assert RetryPolicy.coerce(0).attempts == 1 and RetryPolicy.coerce(3).attempts == 4
    assert RetryPolicy.coerce(True) == RetryPolicy()
    policy = RetryPolicy(attempts=6, backoff=1.0, multiplier=2.0, max_backoff=5.0, jitter=0.0)
    assert RetryPolicy.coerce(policy) is policy
    assert list(policy.delays()) == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = list(RetryPolicy(attempts=50, backoff=1.0, multiplier=1.0, jitter=0.1).delays())
    assert all(0.9 <= d <= 1.1 for d in jittered) and len(set(jittered)) > 1
    for bad in (dict(attempts=0), dict(backoff=-1), dict(multiplier=0.5), dict(jitter=1.0)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy.coerce(-1)


def test_policy_retries_only_what_it_should() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=4, backoff=1.0, jitter=0.0)
    calls = iter([ServerUnreachableError("down"), ModelUnavailableError("loading"), "ok"])

    def flaky() -> str:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert policy.call(flaky, sleep=sleeps.append) == "ok"
    assert sleeps == [1.0, 2.0]
    for error in (InvalidInputError("bad"), RequestTimeoutError("slow"), TritonVLMError("other")):
        attempts: list[int] = []

        def failing(error: Exception = error, attempts: list[int] = attempts) -> None:
            attempts.append(1)
            raise error

        with pytest.raises(type(error)):
            policy.call(failing, sleep=sleeps.append)
        assert len(attempts) == 1


def test_policy_gives_up_after_attempts_or_deadline() -> None:
    attempts = []

    def down() -> None:
        attempts.append(1)
        raise ServerUnreachableError("down")

    with pytest.raises(ServerUnreachableError):
        RetryPolicy(attempts=3, backoff=0.0, jitter=0.0).call(down, sleep=lambda _: None)
    assert len(attempts) == 3
    attempts.clear()
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(ServerUnreachableError):
        RetryPolicy(attempts=100, backoff=4.0, multiplier=1.0, jitter=0.0, deadline=10.0).call(
            down, sleep=sleep, clock=lambda: now[0])
    assert len(attempts) == 3  # tries at 0, 4 and 8 s; a wait to 12 s would pass the deadline


# -- the sync client against a server that is still starting -----------------------------------------------
def test_retries_until_the_server_is_up(port: int) -> None:
    fake = _fake(port).start(after=0.8)
    try:
        started = time.monotonic()
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5, retry=FAST) as client:
            result = client.infer_result("llava", IMAGE, "What is this?")
        assert result.text == "a house" and result.generated_tokens == 3 and result.finish_reason == "stop"
        assert time.monotonic() - started >= 0.7
        assert fake.infer_count() == 1
    finally:
        fake.stop()


def test_without_retry_a_starting_server_is_unreachable(port: int) -> None:
    with TritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(ServerUnreachableError):
        client.infer("llava", IMAGE, "hi")


def test_unavailable_is_retried_and_invalid_arg_is_not(port: int) -> None:
    def script(path: str, attempt: int) -> tuple[int, dict]:
        if "kosmos2" in path:
            return 400, {"error": "prompt: empty; ask the model something"}
        if attempt <= 2:
            return 503, {"error": "model 'llava': weights still loading"}
        return 200, answer("llava", text="ok")

    fake = _fake(port, script=script).start()
    try:
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5, retry=FAST) as client:
            assert client.infer("llava", IMAGE, "hi") == "ok"
            assert fake.infer_count() == 3
            with pytest.raises(InvalidInputError, match="prompt: empty"):
                client.infer("kosmos2", IMAGE, " ")
            assert fake.infer_count() == 4  # once, never retried
    finally:
        fake.stop()


def test_a_server_that_hangs_up_mid_request_is_a_lost_connection(port: int) -> None:
    """A server that crashes while answering: a typed ConnectionLostError (not the HTTP library's own exception),
    from both clients; a retry policy sends the request again."""
    fake = _fake(port, script=lambda path, attempt: (HANG_UP, {}) if attempt % 2 else (200, answer("llava"))).start()

    async def async_infer() -> None:
        async with AsyncTritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(ConnectionLostError, match="closed the connection before answering"):
                await client.infer("llava", IMAGE, "hi")
            await client.infer("llava", IMAGE, "hi")

    try:
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(ConnectionLostError, match="closed the connection before answering") as caught:
                client.infer("llava", IMAGE, "hi")
            assert isinstance(caught.value, ServerUnreachableError)
            assert client.infer("llava", IMAGE, "hi")  # the next request is answered
        asyncio.run(async_infer())
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5, retry=FAST) as client:
            before = fake.infer_count()
            assert client.infer("llava", IMAGE, "hi")
            assert fake.infer_count() == before + 2  # hung up on, then answered
    finally:
        fake.stop()


def test_http_timeout_is_a_request_timeout_and_not_retried(port: int) -> None:
    fake = _fake(port, delay=1.0).start()
    try:
        with (TritonVLMClient(f"127.0.0.1:{port}", timeout=0.3, retry=FAST) as client,
              pytest.raises(RequestTimeoutError, match="within 0.3s")):
            client.infer("llava", IMAGE, "hi")
        time.sleep(0.8)
        assert fake.infer_count() == 1
    finally:
        fake.stop()


def test_grpc_deadline_is_a_request_timeout() -> None:
    from tritonclient.utils import InferenceServerException

    from triton_vlm._protocol.errors import translate

    error = translate(InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),
                      model="llava", url="h:1", timeout=2.0)
    assert isinstance(error, RequestTimeoutError) and isinstance(error, TimeoutError)
    assert "within 2s" in str(error) and error.model == "llava"


# -- infer_many -------------------------------------------------------------------------------------------------
def test_infer_many_keeps_order_and_reports_failures(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    def script(path: str, attempt: int) -> tuple[int, dict]:
        model = path.split("/")[3]
        return (400, {"error": "image: bad"}) if model == "broken" else (200, answer(model, text=model))

    fake = _fake(port, script=script, delay=0.05).start()
    seen: list[int] = []
    try:
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client:
            items = [(IMAGE, "a"), {"image": IMAGE, "prompt": "b", "model_name": "kosmos2"},
                     {"image": IMAGE, "prompt": "c", "model_name": "broken"}, (IMAGE, "d")]
            results = client.infer_many("llava", items, concurrency=3, progress=False, return_exceptions=True,
                                        max_tokens=4, on_result=lambda i, r: seen.append(i))
            assert [r.text if isinstance(r, InferenceResult) else type(r) for r in results] == [
                "llava", "kosmos2", InvalidInputError, "llava"]
            assert sorted(seen) == [0, 1, 2, 3]
            with pytest.raises(InvalidInputError):
                client.infer_many("broken", [(IMAGE, "x")], progress=False)
            with pytest.raises(ValueError, match="concurrency"):
                client.infer_many("llava", [], concurrency=0)
            with pytest.raises(InvalidInputError, match="needs an image and a prompt"):
                client.infer_many("llava", [{"prompt": "no image"}], progress=False)
            assert client.infer_many("llava", [], progress=False) == []
            # The progress bar goes to stderr when asked for.
            client.infer_many("llava", [(IMAGE, "a"), (IMAGE, "b")], progress=True)
        err = capsys.readouterr().err
        assert "llava x4" in err and "0/2 [" in err  # a tqdm bar (it erases itself: leave=False)
    finally:
        fake.stop()


def test_infer_many_runs_requests_concurrently(port: int) -> None:
    fake = _fake(port, delay=0.3).start()
    try:
        with TritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client:
            started = time.monotonic()
            client.infer_many("llava", [(IMAGE, str(i)) for i in range(8)], concurrency=8, progress=False)
            assert time.monotonic() - started < 1.5  # 8 x 0.3 s one by one would be 2.4 s
    finally:
        fake.stop()


# -- the asyncio client ----------------------------------------------------------------------------------------
def test_async_client_infer_retry_and_many(port: int) -> None:
    fake = _fake(port).start(after=0.6)

    async def main() -> None:
        async with AsyncTritonVLMClient(f"127.0.0.1:{port}", timeout=5, retry=FAST) as client:
            result = await client.infer_result("llava", IMAGE, "hi", max_tokens=3, temperature=0.5, seed=1)
            assert result.text == "a house" and result.prompt_tokens == 7
            assert await client.infer("kosmos2", IMAGE, "hi") == "a house"
            many = await client.infer_many("llava", [(IMAGE, str(i)) for i in range(5)], concurrency=2,
                                           progress=False)
            assert [r.generated_tokens for r in many] == [3] * 5  # type: ignore[union-attr]

    try:
        asyncio.run(main())
    finally:
        fake.stop()


def test_async_client_errors(port: int) -> None:
    def script(path: str, attempt: int) -> tuple[int, dict]:
        return 400, {"error": "image: not a recognised image file"}

    async def main() -> None:
        async with AsyncTritonVLMClient(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(InvalidInputError, match="not a recognised image"):
                await client.infer("llava", IMAGE, "hi")
            results = await client.infer_many("llava", [(IMAGE, "a")], progress=False, return_exceptions=True)
            assert isinstance(results[0], InvalidInputError)
        async with AsyncTritonVLMClient(f"127.0.0.1:{free_port()}", timeout=5) as closed:
            with pytest.raises(ServerUnreachableError, match="cannot reach triton-vlm server"):
                await closed.infer("llava", IMAGE, "hi")
            assert await closed.is_ready() is False
            with pytest.raises(ServerUnreachableError, match="not ready after"):
                await closed.wait_until_ready(timeout=0.3)
        async with AsyncTritonVLMClient(f"127.0.0.1:{free_port()}", protocol="grpc", timeout=5) as closed:
            with pytest.raises(ServerUnreachableError):
                await closed.infer("llava", IMAGE, "hi")
            with pytest.raises(ServerUnreachableError):
                async for _ in closed.stream("llava", IMAGE, "hi"):
                    pass

    fake = _fake(port, script=script).start()
    try:
        asyncio.run(main())
    finally:
        fake.stop()


def test_async_client_timeout(port: int) -> None:
    fake = _fake(port, delay=1.0).start()

    async def main() -> None:
        async with AsyncTritonVLMClient(f"127.0.0.1:{port}", timeout=0.3, retry=FAST) as client:
            with pytest.raises(RequestTimeoutError):
                await client.infer("llava", IMAGE, "hi")

    try:
        asyncio.run(main())
        time.sleep(0.8)
        assert fake.infer_count() == 1
    finally:
        fake.stop()


def test_async_client_construction() -> None:
    client = AsyncTritonVLMClient("http://h:9000/", retry=2)
    assert client.url == "h:9000" and client.grpc_url == "h:8001" and client.retry.attempts == 3
    assert AsyncTritonVLMClient("h:9001", protocol="grpc").grpc_url == "h:9001"
    with pytest.raises(ValueError, match="protocol"):
        AsyncTritonVLMClient("h:1", protocol="ftp")  # type: ignore[arg-type]
    import triton_client

    assert triton_client.AsyncTritonVLMClient is AsyncTritonVLMClient
    assert triton_client.RetryPolicy is RetryPolicy
