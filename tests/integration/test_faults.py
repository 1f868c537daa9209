"""Overload and faults against a real server of their own: limits from the environment, a full queue, one request
of a batch failing (an injected CUDA out-of-memory error), a model whose weights are missing (then provided), a
Python stub killed with SIGKILL (in flight, then recovered), a cancelled stream freeing its engine slot, and a
secret that never reaches the log.

The soak test at the end runs on the same server afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import free_ports, server_exit_report
from tests.integration.conftest import ServerHandle
from tests.unit.helpers import image_bytes

from triton_client import TritonVLMClient
from triton_vlm.errors import (
    GenerationError,
    InvalidInputError,
    ModelUnavailableError,
    RequestTimeoutError,
    ServerUnreachableError,
)
from triton_vlm.launcher import ServerOptions, TritonServer
from triton_vlm.launcher.procfs import live_stubs

pytestmark = pytest.mark.integration

HF_SECRET = "hf_reliabilityTestSecret0123456789"
KOSMOS_MAX_PIXELS = 4096
PROMPT = "What is in this image?"
#: Prompts carrying these fail with an injected CUDA out-of-memory error (triton_vlm/backend/faults.py): at parse
#: time (both model kinds) or where the engine's processor runs (engine models).
FAULT_AT_PARSE, FAULT_AT_PREPARE = "fault-at-parse", "fault-at-prepare"


@dataclass
class FaultServer(ServerHandle):
    moondream_dir: Path

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0  # not listening (restarting)

    def stub(self, instance: str) -> int:
        assert self.server.process is not None
        pids = [pid for pid, stub in live_stubs(self.server.process.pid).items() if stub.instance == instance]
        assert pids, f"no live stub {instance}: {live_stubs(self.server.process.pid)}"
        return pids[0]

    def rss_mb(self) -> float:
        """Resident memory of tritonserver and its live stubs together, MiB."""
        assert self.server.process is not None
        pids = [self.server.process.pid, *live_stubs(self.server.process.pid)]
        total = 0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        return total / 1024

    def wait_ready(self, model: str, timeout: float = 90.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.status(f"/v2/models/{model}/ready") == 200 and self.status("/v2/health/ready") == 200:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{model} not ready after {timeout}s; log:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServer]:
    base = tmp_path_factory.mktemp("faults")
    log_path = base / "tritonserver.log"
    moondream_dir = base / "moondream2-weights"  # does not exist yet: its first load fails
    http, grpc, metrics = free_ports()
    env = {
        "HF_TOKEN": HF_SECRET,
        # kosmos2: a tiny queue and tight image limits, from the environment (config.pbtxt: no bound, 40M).
        "TRITON_VLM_KOSMOS2_MAX_QUEUE_SIZE": "2",
        # llava: a queue timeout (opt-in), so that requests may ask for a shorter one.
        "TRITON_VLM_LLAVA_QUEUE_TIMEOUT_MS": "300000",
        "TRITON_VLM_KOSMOS2_MAX_IMAGE_PIXELS": str(KOSMOS_MAX_PIXELS),
        "TRITON_VLM_KOSMOS2_MAX_IMAGE_BYTES": "50000",
        # llava_stream: the engine runs 4 requests and lets 12 wait.
        "TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS": "4",
        "TRITON_VLM_LLAVA_STREAM_MAX_QUEUE_SIZE": "12",
        # The watchdog: a server that stops answering is killed after 10 s (30 s by default).
        "TRITON_VLM_HANG_TIMEOUT_S": "10",
        # moondream2: real (not tiny) weights from a local directory that is not there.
        "TRITON_VLM_MOONDREAM2_TINY": "0",
        "TRITON_VLM_MOONDREAM2_LOCAL_PATH": str(moondream_dir),
        # The test-only fault hook, for the marked prompts only.
        "TRITON_VLM_INJECT_FAULTS": f"parse={FAULT_AT_PARSE},prepare={FAULT_AT_PREPARE}",
    }
    options = ServerOptions(models=("llava", "kosmos2", "moondream2"), tiny=True, http_port=http, grpc_port=grpc,
                            metrics_port=metrics, extra_env=env)
    with open(log_path, "w") as log_file:
        server = TritonServer(options, log_file=log_file)
        server.start()
        try:
            server.wait_until_ready(timeout=180)
            yield FaultServer(server, log_path, moondream_dir)
        finally:
            code = server.stop()
    assert code == 0, server_exit_report(log_path, code)


# -- limits from the environment, overload ----------------------------------------------------------------------
def test_image_limits_come_from_the_environment(faulty: FaultServer, sample_image_bytes: bytes) -> None:
    with urllib.request.urlopen(f"http://{faulty.http_url}/v2/models/kosmos2/config", timeout=5) as response:
        config = json.loads(response.read())
    assert "max_image_pixels" not in config["parameters"]  # the schema's default (40M), which the variable overrides
    with TritonVLMClient(faulty.http_url) as client:
        with pytest.raises(InvalidInputError, match=f"640x480 pixels is over the limit of {KOSMOS_MAX_PIXELS}"):
            client.infer("kosmos2", sample_image_bytes, "An image of", max_tokens=2)
        with pytest.raises(InvalidInputError, match="60000 bytes is over the limit of 50000 bytes"):
            client.infer("kosmos2", b"\x89PNG" + bytes(59996), "An image of", max_tokens=2)
        assert isinstance(client.infer("kosmos2", image_bytes(60, 60), "An image of", max_tokens=2), str)
        assert client.infer("llava", sample_image_bytes, PROMPT, max_tokens=2)  # llava keeps the defaults


def test_overload_is_refused_quickly_and_the_rest_is_served(faulty: FaultServer) -> None:
    """kosmos2 may queue 2 requests: of 24 at once, the overflow gets UNAVAILABLE in well under a second."""
    with urllib.request.urlopen(f"http://{faulty.http_url}/v2/models/kosmos2/config", timeout=5) as response:
        policy = json.loads(response.read())["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == 2
    image = image_bytes(32, 32)
    client = TritonVLMClient(faulty.http_url)
    client.infer("kosmos2", image, "An image of", max_tokens=1)  # weights loaded before the flood

    def call(_: int) -> tuple[str, float, str]:
        started = time.monotonic()
        try:
            client.infer("kosmos2", image, "An image of", max_tokens=24, ignore_eos=True)
            return "ok", time.monotonic() - started, ""
        except Exception as exc:  # noqa: BLE001 - classified below
            return type(exc).__name__, time.monotonic() - started, str(exc)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    refused = [r for r in results if r[0] == "ModelUnavailableError"]
    served = [r for r in results if r[0] == "ok"]
    assert len(refused) + len(served) == len(results), results
    assert refused and served, results
    assert all("overloaded" in message and "queue" in message for _, _, message in refused)
    assert max(seconds for _, seconds, _ in refused) < 1.0, refused
    assert client.infer("kosmos2", image, "An image of", max_tokens=1) is not None  # and it still serves
    client.close()


def test_engine_overload_is_refused_quickly(faulty: FaultServer) -> None:
    """The engine model returns from execute at once, so the bound is its own: 4 running + 12 waiting."""
    image = image_bytes(32, 32)
    client = TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=120)
    "".join(client.stream("llava", image, PROMPT, max_tokens=1))  # engine up before the flood

    def call(_: int) -> tuple[str, float, str]:
        started = time.monotonic()
        try:
            "".join(client.stream("llava", image, PROMPT, max_tokens=200, ignore_eos=True))
            return "ok", time.monotonic() - started, ""
        except Exception as exc:  # noqa: BLE001 - classified below
            return type(exc).__name__, time.monotonic() - started, str(exc)

    with ThreadPoolExecutor(28) as pool:
        results = list(pool.map(call, range(28)))
    client.close()
    refused = [r for r in results if r[0] == "ModelUnavailableError"]
    assert len(refused) + sum(r[0] == "ok" for r in results) == len(results), results
    # Some are refused, and at least the 4 the engine runs are served. (16 fit at once in the engine, but a
    # burst can also fill Triton's queue in front of it before execute drains it: a CI run saw 13 refused.)
    assert refused and len(refused) <= 28 - 4, results
    # Mostly the engine's own bound ("limit 16"); under a burst Triton's queue in front of it may refuse first.
    assert all("overloaded" in message and ("limit 16" in message or "queue" in message)
               for _, _, message in refused), refused
    assert max(seconds for _, seconds, _ in refused) < 2.0, refused


def test_a_request_may_bound_its_wait_in_the_queue(faulty: FaultServer) -> None:
    """With a queue timeout configured, a request may ask for a shorter one: still queued after it, it is refused
    (503)."""
    image = list(image_bytes(32, 32))
    body = {"parameters": {"timeout": 1000},  # microseconds
            "inputs": [{"name": "image", "shape": [1, len(image)], "datatype": "UINT8", "data": image},
                       {"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["What is this?"]},
                       {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [1]}]}
    client = TritonVLMClient(faulty.http_url)
    client.infer("llava", image_bytes(32, 32), "What is this?", max_tokens=1)
    with ThreadPoolExecutor(1) as pool:  # 600 decode steps keep llava's only instance busy for a while
        busy = [pool.submit(client.infer, "llava", image_bytes(32, 32), "What is this?", max_tokens=600,
                            ignore_eos=True)]
        time.sleep(0.15)
        started = time.monotonic()
        request = urllib.request.Request(f"http://{faulty.http_url}/v2/models/llava/infer", method="POST",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        message = info.value.read().decode()
        info.value.close()  # an open keep-alive connection would hold up the server's shutdown
        waited = time.monotonic() - started
        assert all(len(future.result()) > 0 for future in busy)
    client.close()
    assert info.value.code == 503 and "timeout" in message.lower(), (message, waited)


# -- one failing request in a batch ------------------------------------------------------------------------------
def _assert_ready(faulty: FaultServer, model: str) -> None:
    assert faulty.status("/v2/health/ready") == 200
    assert faulty.status(f"/v2/models/{model}/ready") == 200


def test_a_failing_request_leaves_the_rest_of_its_engine_batch_and_the_model_alone(faulty: FaultServer) -> None:
    """kosmos2_stream serves nothing before this test: its first request builds the engine, and the requests sent
    meanwhile arrive together, one of them failing in the engine's processor (CUDA out of memory, injected). The
    others are answered, and the model stays READY and serves on."""
    image = image_bytes(32, 32)
    client = TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=120)

    def call(prompt: str) -> object:
        return _outcome(lambda: "".join(client.stream("kosmos2", image, prompt, max_tokens=4, ignore_eos=True)))

    prompts = ["<grounding>An image of", f"An image of {FAULT_AT_PREPARE}", "An image of a", "<grounding>A photo of"]
    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        first = pool.submit(call, "An image of")  # builds the engine
        time.sleep(0.3)
        results = list(pool.map(call, prompts))
        assert isinstance(first.result(), str), first.result()
    failed = results.pop(1)
    assert isinstance(failed, GenerationError) and "CUDA out of memory" in str(failed), failed
    assert all(isinstance(result, str) for result in results), results
    _assert_ready(faulty, "kosmos2_stream")
    assert isinstance(call("An image of"), str)
    client.close()
    assert "fault injected at 'prepare'" in faulty.log()  # with its traceback


def test_a_failing_request_leaves_the_rest_of_its_batch_alone(faulty: FaultServer) -> None:
    """llava (the batched model) is busy with a long request while four more queue, so they run as one batch; one
    of them fails as it is parsed (CUDA out of memory, injected). The other three are answered."""
    image = image_bytes(32, 32)
    client = TritonVLMClient(faulty.http_url, timeout=120)
    client.infer("llava", image, PROMPT, max_tokens=1)
    prompts = [PROMPT, f"{PROMPT} {FAULT_AT_PARSE}", f"{PROMPT} Say more.", f"{PROMPT} Briefly."]
    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        busy = pool.submit(client.infer, "llava", image, PROMPT, max_tokens=600, ignore_eos=True)
        time.sleep(0.15)
        results = list(pool.map(lambda p: _outcome(lambda: client.infer("llava", image, p, max_tokens=3)), prompts))
        assert busy.result()
    failed = results.pop(1)
    assert isinstance(failed, GenerationError) and "CUDA out of memory" in str(failed), failed
    assert all(isinstance(result, str) for result in results), results
    _assert_ready(faulty, "llava")
    assert client.infer("llava", image, PROMPT, max_tokens=2)
    client.close()


# -- a model that cannot load ---------------------------------------------------------------------------------
def test_a_model_that_fails_to_load_says_why_while_the_others_serve(faulty: FaultServer,
                                                                    sample_image_bytes: bytes) -> None:
    from triton_vlm.tiny import ensure_tiny_checkpoint

    with TritonVLMClient(faulty.http_url) as client:
        for _ in range(2):  # each request retries the load, and fails the same way
            with pytest.raises(ModelUnavailableError, match="local_path") as info:
                client.infer("moondream2", sample_image_bytes, PROMPT, max_tokens=2)
            assert str(faulty.moondream_dir) in str(info.value) and "no config.json" in str(info.value)
            assert client.infer("llava", sample_image_bytes, PROMPT, max_tokens=2)
            assert isinstance(client.infer("kosmos2", image_bytes(32, 32), "An image of", max_tokens=2), str)
        # The operator provides the weights: the next request loads them, no restart needed.
        shutil.copytree(ensure_tiny_checkpoint("moondream2"), faulty.moondream_dir)
        assert isinstance(client.infer("moondream2", sample_image_bytes, PROMPT, max_tokens=2), str)
    assert faulty.log().count("no config.json") >= 2  # the reason is in the server log too


def test_hf_token_never_reaches_the_log(faulty: FaultServer, sample_image_bytes: bytes) -> None:
    """Load failures (above) happened with HF_TOKEN in the server's environment: the secret is nowhere."""
    assert "local_path" in faulty.log()
    assert HF_SECRET not in faulty.log()
    assert HF_SECRET[3:15] not in faulty.log()
    with urllib.request.urlopen(f"http://{faulty.http_url}/v2/models/moondream2/config", timeout=5) as response:
        assert HF_SECRET not in response.read().decode()


# -- a dead Python stub ------------------------------------------------------------------------------------------
def _restarts(faulty: FaultServer, model: str) -> int:
    assert faulty.server.supervisor is not None
    return len(faulty.server.supervisor.recoveries(model))


def test_a_killed_stub_fails_its_requests_then_the_model_serves_again(faulty: FaultServer,
                                                                      sample_image_bytes: bytes) -> None:
    client = TritonVLMClient(faulty.http_url, timeout=60)
    assert client.infer("llava", sample_image_bytes, PROMPT, max_tokens=2)
    before = _restarts(faulty, "llava")
    in_flight: list[object] = []
    worker = threading.Thread(target=lambda: in_flight.append(_outcome(lambda: client.infer(
        "llava", sample_image_bytes, PROMPT, max_tokens=900, ignore_eos=True))))
    worker.start()
    time.sleep(0.05)  # queued or executing: either way it is the dead stub's (900 tokens take far longer)
    os.kill(faulty.stub("llava_0_0"), signal.SIGKILL)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the in-flight request never got an answer"
    assert isinstance(in_flight[0], ModelUnavailableError), in_flight
    # Readiness tells the truth: not ready while the model reloads, ready again within a bounded time.
    seconds = faulty.wait_ready("llava", timeout=90)
    assert _restarts(faulty, "llava") == before + 1
    assert faulty.server.supervisor.recoveries("llava")[-1].ready_after_s is not None
    assert seconds < 90
    assert client.infer("llava", sample_image_bytes, PROMPT, max_tokens=3)
    client.close()


def test_readiness_is_not_ready_while_the_model_reloads(faulty: FaultServer) -> None:
    os.kill(faulty.stub("kosmos2_0_0"), signal.SIGKILL)
    saw_unready = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not saw_unready:
        saw_unready = faulty.status("/v2/models/kosmos2/ready") != 200 and faulty.status("/v2/health/ready") != 200
        time.sleep(0.02)
    assert saw_unready, "readiness kept saying 200 with a dead stub"
    faulty.wait_ready("kosmos2")
    with TritonVLMClient(faulty.http_url) as client:
        assert isinstance(client.infer("kosmos2", image_bytes(32, 32), "An image of", max_tokens=2), str)


def test_a_killed_engine_stub_ends_its_streams_then_streams_again(faulty: FaultServer,
                                                                  sample_image_bytes: bytes) -> None:
    """Killed while it streams, the engine's stub takes Triton 2.51 down with it at times (the Python backend
    aborts on the lock the dead stub held): the launcher starts the server again. Otherwise Triton sends no
    final response for the stream, which ends at its client's timeout, while the supervisor reloads the model.
    Either way the stream ends with a clear error and, within a bounded time, new streams work."""
    client = TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=8)
    stream = client.stream("llava", sample_image_bytes, PROMPT, max_tokens=900, ignore_eos=True)
    next(stream)
    os.kill(faulty.stub("llava_stream_0_0"), signal.SIGKILL)
    started = time.monotonic()
    # A dead stub's streams get no final response from Triton: they end at the client's timeout.
    with pytest.raises((ModelUnavailableError, ServerUnreachableError, RequestTimeoutError)):
        for _ in stream:
            pass
    assert time.monotonic() - started < 30
    client.close()
    faulty.wait_ready("llava_stream", timeout=120)
    with TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=60) as client:
        assert "".join(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=3))
    events = faulty.server.supervisor.recoveries()
    assert events and events[-1].model in ("llava_stream", "(server)"), events


def test_a_cancelled_stream_frees_its_engine_slot(faulty: FaultServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=60) as client:
        assert "".join(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=2))
        stream = client.stream("llava", sample_image_bytes, PROMPT, max_tokens=900, ignore_eos=True)
        next(stream)
        stream.close()  # cancels the request
        deadline = time.monotonic() + 20
        pattern = "aborted after"
        while time.monotonic() < deadline and pattern not in faulty.log():
            time.sleep(0.1)
        line = next(line for line in faulty.log().splitlines() if pattern in line)
        assert "cancelled by its client" in faulty.log()
        free, total = [int(n) for n in line.split("(")[1].split(" slots free")[0].split(" of ")]
        assert free == total, line  # its slot (and KV) is back; nothing else runs
        assert "".join(client.stream("llava", sample_image_bytes, PROMPT, max_tokens=2))


def _signal_server_and_wait_for_its_restart(faulty: FaultServer, signum: int, image: bytes) -> int:
    """Send ``signum`` to tritonserver, wait until the launcher runs a new one and it serves again; the old
    process's exit code."""
    process = faulty.server.process
    assert process is not None
    restarts = len(faulty.server.server_restarts)
    os.kill(process.pid, signum)
    deadline = time.monotonic() + 90
    while faulty.server.process is process and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(faulty.server.server_restarts) == restarts + 1
    faulty.wait_ready("llava", timeout=120)
    with TritonVLMClient(faulty.http_url, timeout=60) as client:
        assert client.infer("llava", image, PROMPT, max_tokens=2)
    assert process.returncode is not None
    return process.returncode


def test_a_crashed_server_is_started_again(faulty: FaultServer, sample_image_bytes: bytes) -> None:
    """When tritonserver itself dies (here: SIGKILL), the launcher starts it again on the same ports."""
    _signal_server_and_wait_for_its_restart(faulty, signal.SIGKILL, sample_image_bytes)
    assert faulty.server.supervisor.recoveries("(server)")


def test_a_hung_server_is_killed_and_started_again(faulty: FaultServer, sample_image_bytes: bytes) -> None:
    """A server that still runs but answers nothing (here: SIGSTOP; in the wild, the Python backend's abort hanging
    in Triton's crash handler) is killed by the watchdog once it has been silent for TRITON_VLM_HANG_TIMEOUT_S,
    then started again like a crashed one."""
    assert _signal_server_and_wait_for_its_restart(faulty, signal.SIGSTOP, sample_image_bytes) == -signal.SIGKILL
    assert any("hung" in event.detail for event in faulty.server.supervisor.recoveries("(server)"))


def _outcome(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


# -- soak ---------------------------------------------------------------------------------------------------------
SOAK_REQUESTS = 2000
SOAK_CONCURRENCY = 32


@pytest.mark.soak
def test_soak_mixed_good_and_bad_requests_with_a_stub_kill(faulty: FaultServer) -> None:
    """2,000 mixed requests (good and bad, plain and streamed) at 32 concurrent, the llava stub killed halfway.
    Every request gets an answer or a clear error; memory of the server and its stubs stays flat.

    At times Triton 2.51 aborts during the reload that follows the kill (docs/reliability.md): the launcher then
    starts it again, and the requests it dropped get a ServerUnreachableError (ConnectionLostError for those in
    flight). Only then are those errors allowed, and only until the new server answers."""
    images = [image_bytes(24 + 4 * i, 20 + 2 * i, seed=i) for i in range(4)]
    http = TritonVLMClient(faulty.http_url, timeout=60)
    grpc = TritonVLMClient(faulty.grpc_url, protocol="grpc", timeout=60)
    http.infer("llava", images[0], PROMPT, max_tokens=1)  # weights loaded before we measure
    "".join(grpc.stream("llava", images[0], PROMPT, max_tokens=1))

    def request(i: int) -> tuple[str, bool]:
        """One request of kind i % 10; returns (outcome, whether it was a valid request)."""
        kind, image = i % 10, images[i % len(images)]
        calls = {
            6: (lambda: http.infer("llava", b"not an image %d" % i, PROMPT, max_tokens=1), False),
            7: (lambda: http.infer("llava", image, "" if i % 20 < 10 else "<image> hi", max_tokens=1), False),
            8: (lambda: http.infer("llava", image, PROMPT, max_tokens=1, top_p=2.0), False),
            9: (lambda: "".join(grpc.stream("llava", image, PROMPT, max_tokens=2)), True),
        }
        call, valid = calls.get(kind, (lambda: http.infer("llava", image, PROMPT, max_tokens=1 + i % 2), True))
        try:
            call()
            return "ok", valid
        except InvalidInputError:
            return "invalid", valid
        except ModelUnavailableError:
            time.sleep(0.5)  # a client backs off when told the model is unavailable
            return "unavailable", valid
        except ServerUnreachableError:
            faulty.wait_ready("llava", timeout=120)  # a client waits for the server to be back
            return "unreachable", valid
        except Exception as exc:  # noqa: BLE001 - counted as a failure of the test below
            return f"{type(exc).__name__}: {exc}", valid

    done = [0]
    rss: dict[str, float] = {}
    lock = threading.Lock()

    def counted(i: int) -> tuple[str, bool, float, float]:
        sent = time.monotonic()
        outcome, valid = request(i)
        with lock:
            done[0] += 1
            count = done[0]
        if count == 300:
            rss["warm"] = faulty.rss_mb()
        if count == SOAK_REQUESTS // 2:
            rss["before kill"] = faulty.rss_mb()
            os.kill(faulty.stub("llava_0_0"), signal.SIGKILL)
        return outcome, valid, sent, time.monotonic()

    started = time.monotonic()
    server_restarts = len(faulty.server.server_restarts)
    with ThreadPoolExecutor(SOAK_CONCURRENCY) as pool:
        results = list(pool.map(counted, range(SOAK_REQUESTS)))
    elapsed = time.monotonic() - started
    faulty.wait_ready("llava")
    rss["end"] = faulty.rss_mb()
    http.close()
    grpc.close()

    outcomes = [outcome for outcome, *_ in results]
    restarted = faulty.server.server_restarts[server_restarts:]
    clear = ("ok", "invalid", "unavailable") + (("unreachable",) if restarted else ())
    strange = [o for o in outcomes if o not in clear]
    assert not strange, strange[:5]
    valid_refused = [r for r in results if r[1] and r[0] == "invalid"]
    invalid_served = [r for r in results if not r[1] and r[0] == "ok"]
    assert not valid_refused and not invalid_served
    # Errors only for requests sent around the kill (in flight or queued on the dead stub, or sent while the
    # model reloaded or the server restarted), never for those sent once it serves again.
    if restarted:
        recovered_at = min(finished for outcome, _, sent, finished in results
                           if outcome == "ok" and sent > restarted[-1])
    else:
        recovery = faulty.server.supervisor.recoveries("llava")[-1]
        assert recovery.ready_after_s is not None
        recovered_at = recovery.started + recovery.ready_after_s
    late = [r for r in results if r[0] in ("unavailable", "unreachable") and r[2] > recovered_at + 1.0]
    assert not late, late[:5]
    assert outcomes.count("unavailable") + outcomes.count("unreachable") < SOAK_REQUESTS // 5
    assert outcomes.count("ok") > SOAK_REQUESTS // 2
    print(f"soak: {SOAK_REQUESTS} requests in {elapsed:.0f}s; {outcomes.count('ok')} ok, "
          f"{outcomes.count('invalid')} invalid, {outcomes.count('unavailable')} unavailable, "
          f"{outcomes.count('unreachable')} unreachable ({len(restarted)} server restarts); RSS MiB {rss}")
    # Flat memory: what the server and its stubs hold after 2,000 requests, errors and a reload is about what
    # they held after the first 300 (the reloaded stub loads its weights again, so its share starts over).
    assert rss["before kill"] < rss["warm"] * 1.1 + 100, rss
    assert rss["end"] < rss["warm"] * 1.1 + 100, rss
