"""Reliability pieces without a server: /dev/shm and queue-policy checks of the launcher, the command line's
security flags, error translation for overload and restarts, the context check, safetensors-only and
trust_remote_code loading, and property tests of prompt decoding. The stub supervisor and the watchdog:
test_supervisor.py; the server's restarts: test_restarts.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from triton_vlm._protocol.errors import translate
from triton_vlm._protocol.model_config import load_model_config
from triton_vlm.config import ConfigError, ModelSettings, RequestLimits, read_settings
from triton_vlm.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelUnavailableError,
    RequestTimeoutError,
    UnknownModelError,
)
from triton_vlm.launcher import LauncherError, ServerOptions, TritonServer, preflight
from triton_vlm.launcher import server as server_module
from triton_vlm.launcher.policies import (
    apply_batch_delay,
    apply_queue_policy,
    instance_count,
    own_batch_delay,
    queue_limits,
)
from triton_vlm.launcher.repository import model_settings, render_repository
from triton_vlm.loading import load_model
from triton_vlm.models import get_family
from triton_vlm.models.generation import check_context
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import SamplingParams
from triton_vlm.tiny import ensure_tiny_checkpoint

from .helpers import REPOSITORY, free_port, image_bytes

CPU = torch.device("cpu")
MIB = 1024 * 1024


# -- /dev/shm -------------------------------------------------------------------------------------------------------
def test_too_little_shm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: 60 * MIB)
    with pytest.raises(LauncherError) as info:
        preflight.check_shm(stubs=4, env={})
    message = str(info.value)
    assert "/dev/shm has 60 MiB free" in message and "at least 128 MiB for 4 model instance(s)" in message
    assert "--shm-size=2g" in message and "TRITON_VLM_MIN_SHM_MB" in message


def test_enough_shm_passes_and_a_low_floor_only_warns(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: 300 * MIB)
    preflight.check_shm(stubs=4, env={})
    assert "large images or full batches may fail" in caplog.text
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: 4096 * MIB)
    caplog.clear()
    preflight.check_shm(stubs=4, env={})
    assert caplog.text == ""


@pytest.mark.parametrize("env, free, ok", [
    ({"TRITON_VLM_MIN_SHM_MB": "0"}, 1, True),       # 0 skips the check
    ({"TRITON_VLM_MIN_SHM_MB": "10"}, 11 * MIB, True),
    ({"TRITON_VLM_MIN_SHM_MB": "10"}, 9 * MIB, False),
])
def test_shm_floor_override(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], free: int, ok: bool) -> None:
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: free)
    if ok:
        preflight.check_shm(stubs=8, env=env)
    else:
        with pytest.raises(LauncherError, match="at least 10 MiB"):
            preflight.check_shm(stubs=8, env=env)


def test_bad_shm_override_and_a_missing_shm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="TRITON_VLM_MIN_SHM_MB must be a number"):
        preflight.check_shm(stubs=1, env={"TRITON_VLM_MIN_SHM_MB": "lots"})
    assert preflight.shm_free_bytes(str(tmp_path / "none")) is None
    preflight.check_shm(stubs=1, path=str(tmp_path / "none"), env={})  # not Linux: a warning only
    assert preflight.shm_free_bytes(str(tmp_path)) > 0


def test_start_refuses_too_little_shm_before_starting_anything(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: 5 * MIB)
    started: list[object] = []
    monkeypatch.setattr(server_module.subprocess, "Popen", lambda *a, **k: started.append(a))
    ports = sorted({free_port() for _ in range(3)})
    while len(ports) < 3:
        ports = sorted({free_port() for _ in range(3)})
    server = TritonServer(ServerOptions(models=("llava",), http_port=ports[0], grpc_port=ports[1],
                                        metrics_port=ports[2], work_dir=tmp_path, instance_kind="cpu"))
    with pytest.raises(LauncherError, match="/dev/shm has 5 MiB free.*2 model instance"):
        server.start()
    assert server.process is None and not started


# -- the command line: explicit model control behind the admin key, queue limits ---------------------------------
def _command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **options: Any) -> tuple[TritonServer, list[str]]:
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda path=preflight.SHM_PATH: 4096 * MIB)
    commands: list[list[str]] = []

    class FakeProcess:
        pid = 2**22 + 7  # no such process

        def poll(self) -> int:
            return 0

    def popen(command: list[str], **kwargs: Any) -> FakeProcess:
        commands.append(command)
        return FakeProcess()

    monkeypatch.setattr(server_module.subprocess, "Popen", popen)
    ports = sorted({free_port() for _ in range(3)})
    while len(ports) < 3:
        ports = sorted({free_port() for _ in range(3)})
    server = TritonServer(ServerOptions(models=("llava",), http_port=ports[0], grpc_port=ports[1],
                                        metrics_port=ports[2], work_dir=tmp_path, instance_kind="cpu",
                                        supervise=False, **options))
    server.start()
    return server, commands[0]


def test_models_load_explicitly_and_the_admin_apis_need_the_key(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.delenv("TRITON_VLM_ADMIN_KEY", raising=False)
    server, command = _command(monkeypatch, tmp_path)
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    assert "--model-control-mode=none" not in command
    apis = "model-repository,shared-memory,trace,logging"
    assert f"--http-restricted-api={apis}:triton-vlm-admin-key={server.admin_key}" in command
    assert f"--grpc-restricted-protocol={apis}:triton-vlm-admin-key={server.admin_key}" in command
    assert len(server.admin_key) >= 24 and server.admin_headers == {"triton-vlm-admin-key": server.admin_key}
    assert "--http-address=127.0.0.1" in command  # loopback unless --host
    other, _ = _command(monkeypatch, tmp_path / "again")
    assert other.admin_key != server.admin_key  # random per run
    assert server.supervisor is None  # supervise=False


def test_admin_key_from_the_environment_or_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_VLM_ADMIN_KEY", "from-env")
    assert _command(monkeypatch, tmp_path / "a")[0].admin_key == "from-env"
    assert _command(monkeypatch, tmp_path / "b", admin_key="given")[0].admin_key == "given"


def test_queue_limits_reach_the_rendered_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_VLM_LLAVA_STREAM_MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("TRITON_VLM_LLAVA_STREAM_BATCH_DELAY_US", "100")
    _command(monkeypatch, tmp_path, max_queue_size=3, queue_timeout_ms=250, batch_delay_us=7)
    batching = load_model_config(tmp_path / "models" / "llava" / "config.pbtxt").dynamic_batching
    policy = batching.default_queue_policy
    assert policy.max_queue_size == 3 and policy.default_timeout_microseconds == 250_000
    assert batching.max_queue_delay_microseconds == 7
    assert policy.allow_timeout_override
    stream = load_model_config(tmp_path / "models" / "llava_stream" / "config.pbtxt")
    assert stream.parameters["max_queue_size"].string_value == "7"  # the per-model environment wins
    assert not stream.dynamic_batching.HasField("default_queue_policy")  # the engine's own bound, not Triton's
    assert stream.dynamic_batching.max_queue_delay_microseconds == 100


def test_batch_delay_precedence_and_rendering(tmp_path: Path) -> None:
    assert own_batch_delay("m", env={}) is None
    assert own_batch_delay("m", env={"TRITON_VLM_M_BATCH_DELAY_US": "0"}) == 0
    served = render_repository(REPOSITORY, tmp_path / "models", ["kosmos2"], "KIND_CPU")
    config = served / "kosmos2" / "config.pbtxt"
    with pytest.raises(LauncherError, match="batch_delay_us must be >= 0"):
        apply_batch_delay(served / "kosmos2", -5)
    assert load_model_config(config).dynamic_batching.max_queue_delay_microseconds == 0
    assert not apply_batch_delay(served / "kosmos2", None)
    assert apply_batch_delay(served / "kosmos2", 1500)
    assert load_model_config(config).dynamic_batching.max_queue_delay_microseconds == 1500
    assert apply_batch_delay(served / "kosmos2", 250, own_us=0)  # the model's own setting wins
    assert load_model_config(config).dynamic_batching.max_queue_delay_microseconds == 0
    (tmp_path / "plain" / "1").mkdir(parents=True)
    (tmp_path / "plain" / "config.pbtxt").write_text('name: "plain"\nbackend: "python"\n')
    assert not apply_batch_delay(tmp_path / "plain", 10)  # no dynamic batching: no delay to set
    stream = render_repository(REPOSITORY, tmp_path / "streams", ["llava_stream"], "KIND_CPU") / "llava_stream"
    assert not apply_batch_delay(stream, 2000)  # decoupled: the engine batches, a launcher-wide delay stays off
    assert apply_batch_delay(stream, None, own_us=2000)  # its own TRITON_VLM_LLAVA_STREAM_BATCH_DELAY_US applies


def test_batched_configs_keep_triton_prefetching_and_engines_bound_their_queue(tmp_path: Path) -> None:
    """The weight-holding batched models have no queue policy (Triton 2.51 stops prefetching with one, and a
    single instance then stalls up to 500 ms between batches); the engine models keep theirs as their bound."""
    for model in ("llava", "kosmos2", "moondream2", "smolvlm"):
        config = load_model_config(REPOSITORY / model / "config.pbtxt")
        assert config.dynamic_batching.max_queue_delay_microseconds == 0
        assert not config.dynamic_batching.HasField("default_queue_policy"), model
        assert not config.dynamic_batching.priority_queue_policy
    served = render_repository(REPOSITORY, tmp_path / "models", ["llava_stream", "kosmos2_stream",
                                                                  "moondream2_stream"], None)
    for model in ("llava_stream", "kosmos2_stream", "moondream2_stream"):
        config = load_model_config(served / model / "config.pbtxt")
        assert not config.dynamic_batching.HasField("default_queue_policy"), model
        assert model_settings(REPOSITORY, model, {}).engine.max_queue_size == 256  # the schema's default
    for model in ("llava", "kosmos2", "moondream2"):
        settings = model_settings(REPOSITORY, model, {})
        limits = settings.limits
        assert (limits.max_image_bytes, limits.max_image_pixels, limits.max_image_aspect_ratio) == (
            20 * MIB, 40_000_000, 100.0)
        assert not settings.weights.trust_remote_code


def test_image_limits_are_overridable_by_environment() -> None:
    params = {"model_family": "llava", "max_image_pixels": "40000000"}
    env = {"TRITON_VLM_LLAVA_MAX_IMAGE_PIXELS": "4096", "TRITON_VLM_LLAVA_MAX_IMAGE_BYTES": "1000",
           "TRITON_VLM_LLAVA_MAX_IMAGE_ASPECT_RATIO": "3.5"}
    limits = read_settings("llava", params, env=env).limits
    assert (limits.max_image_pixels, limits.max_image_bytes, limits.max_image_aspect_ratio) == (4096, 1000, 3.5)
    with pytest.raises(InvalidInputError, match="max_image_aspect_ratio must be >= 1"):
        read_settings("llava", {**params, "max_image_aspect_ratio": "0.5"}, env={})


@pytest.mark.parametrize("env, option, expected", [
    ({}, (None, None), (None, None)),
    ({}, (5, 100), (5, 100)),
    ({"TRITON_VLM_M_MAX_QUEUE_SIZE": "9"}, (5, None), (9, None)),
    ({"TRITON_VLM_M_QUEUE_TIMEOUT_MS": "0"}, (None, 100), (None, 0)),
])
def test_queue_limit_precedence(env: dict[str, str], option: tuple, expected: tuple) -> None:
    assert queue_limits("m", *option, env=env) == expected


def test_bad_queue_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"max_queue_size must be a number, got 'lots' \(from "
                                          r"TRITON_VLM_M_MAX_QUEUE_SIZE\)"):
        queue_limits("m", None, None, env={"TRITON_VLM_M_MAX_QUEUE_SIZE": "lots"})
    with pytest.raises(LauncherError, match="max_queue_size must be >= 0"):
        queue_limits("m", -1, None, env={})


def test_apply_queue_policy_and_instance_count(tmp_path: Path) -> None:
    served = render_repository(REPOSITORY, tmp_path / "models", ["kosmos2"], "KIND_CPU")
    assert not apply_queue_policy(served / "kosmos2", None, None)
    assert apply_queue_policy(served / "kosmos2", 5, None)
    policy = load_model_config(served / "kosmos2" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 5 and policy.default_timeout_microseconds == 0
    assert not policy.allow_timeout_override
    assert apply_queue_policy(served / "kosmos2", None, 2000)
    policy = load_model_config(served / "kosmos2" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 5 and policy.default_timeout_microseconds == 2_000_000
    assert policy.allow_timeout_override and policy.timeout_action == policy.REJECT
    assert instance_count(served / "kosmos2") == 1
    (tmp_path / "plain" / "1").mkdir(parents=True)
    (tmp_path / "plain" / "config.pbtxt").write_text('name: "plain"\nbackend: "python"\n')
    assert not apply_queue_policy(tmp_path / "plain", 4, 10)  # no dynamic batching: nothing to bound
    stream = render_repository(REPOSITORY, tmp_path / "streams", ["kosmos2_stream"], "KIND_CPU") / "kosmos2_stream"
    assert not apply_queue_policy(stream, None, 1000)  # no queue timeout in the engine
    assert apply_queue_policy(stream, 9, 1000)
    config = load_model_config(stream / "config.pbtxt")
    assert config.parameters["max_queue_size"].string_value == "9"
    assert not config.dynamic_batching.HasField("default_queue_policy")
    assert instance_count(tmp_path / "plain") == 1


# -- error translation --------------------------------------------------------------------------------------------
def test_out_of_memory_in_a_batch_fails_only_what_does_not_fit(llava_runtime: VLMRuntime,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that runs out of GPU memory is split and retried one by one; a request that does not fit alone
    gets its own error, the others are answered."""
    real = llava_runtime._run
    image = image_bytes(24, 24)
    requests = [llava_runtime.make_request(image, f"What is this? {i}", max_tokens=2) for i in range(4)]

    def run(loaded: Any, batch: list[GenerationRequest]) -> list:
        if len(batch) > 1 or batch[0].prompt.endswith("2"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loaded, batch)

    monkeypatch.setattr(llava_runtime, "_run", run)
    results = llava_runtime.generate(requests)
    assert [type(r).__name__ for r in results] == ["GenerationOutput", "GenerationOutput", "GenerationError",
                                                   "GenerationOutput"]
    assert "out of GPU memory" in str(results[2])


@pytest.mark.parametrize("message, status, kind, fragment", [
    ("[request id: <id_unknown>] Exceeds maximum queue size", "503", ModelUnavailableError, "overloaded"),
    ("Request timeout expired", "503", ModelUnavailableError, "overloaded"),
    ("Stub process 'llava_0_0' is not healthy.", "500", ModelUnavailableError, "not available right now"),
    ("Request for unknown model: 'llava' has no available versions", "400", ModelUnavailableError, "restarting"),
    # The client's own deadline: its own type (not retried: the server may still be working on it).
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError, "no answer"),
    ("Request for unknown model: 'nope' is not found", "400", UnknownModelError, "nope"),
])
def test_overload_and_restart_errors_are_unavailable(message: str, status: str, kind: type, fragment: str) -> None:
    error = translate(InferenceServerException(message, status=status), model="llava", url="host:1")
    assert type(error) is kind and fragment in str(error)
    assert error.model == "llava" and error.code == kind.triton_code


# -- the context check (HF path) ----------------------------------------------------------------------------------
class ContextFamily:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def context_length(self, model: object) -> int | None:
        return self.limit


def test_check_context() -> None:
    params = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=1)]
    check_context(ContextFamily(100), None, [80, 99], params)  # type: ignore[arg-type]
    check_context(ContextFamily(None), None, [10**6], params)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"81 tokens .* \+ max_tokens 20 exceed the model's context of 100 "
                                                r"tokens; ask for at most max_tokens=19"):
        check_context(ContextFamily(100), None, [81, 1], params)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="shorten the prompt"):
        check_context(ContextFamily(100), None, [10, 120], params)  # type: ignore[arg-type]


def test_context_length_of_the_families(llava_runtime: VLMRuntime, kosmos2_runtime: VLMRuntime) -> None:
    for runtime in (llava_runtime, kosmos2_runtime):
        loaded = runtime.ensure_loaded()
        assert loaded.family.context_length(loaded.model) == 1024  # the tiny checkpoints' max positions
    assert get_family("llava").context_length(object()) is None


def test_a_request_beyond_the_context_fails_alone_in_its_batch(llava_runtime: VLMRuntime) -> None:
    image = image_bytes(24, 24)
    good = llava_runtime.make_request(image, "What is this?", max_tokens=3)
    long = llava_runtime.make_request(image, "tell me more " * 800, max_tokens=3)
    greedy_long = llava_runtime.make_request(image, "What is this?", max_tokens=1024)
    results = llava_runtime.generate([good, long, good, greedy_long])
    assert isinstance(results[1], InvalidInputError) and "context of 1024 tokens" in str(results[1])
    assert isinstance(results[3], InvalidInputError) and "max_tokens 1024" in str(results[3])
    (alone,) = llava_runtime.generate([good])
    assert results[0] == results[2] == alone  # the good ones are answered as if alone


# -- weights: safetensors only, no remote code --------------------------------------------------------------------
def _settings(family: str, **overrides: Any) -> ModelSettings:
    return ModelSettings(model_name=family, family=family).with_overrides(**overrides)


def test_pickle_only_checkpoint_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    checkpoint = tmp_path / "pickled-llava"
    shutil.copytree(ensure_tiny_checkpoint("llava"), checkpoint)
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_model(_settings("llava", local_path=str(checkpoint)), CPU)
    message = str(info.value)
    assert "only as pickle files" in message and "safetensors only" in message and str(checkpoint) in message


def test_moondream2_refuses_pickle_weights_too(tmp_path: Path) -> None:
    checkpoint = tmp_path / "pickled-moondream"
    shutil.copytree(ensure_tiny_checkpoint("moondream2"), checkpoint)
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(_settings("moondream2", local_path=str(checkpoint)), CPU)


def test_remote_code_in_a_checkpoint_never_runs_by_default(tmp_path: Path) -> None:
    """A checkpoint that ships code (auto_map) and asks to run it: without trust_remote_code it does not run."""
    checkpoint = tmp_path / "with-code"
    shutil.copytree(ensure_tiny_checkpoint("llava"), checkpoint)
    marker = tmp_path / "code-ran"
    (checkpoint / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "from transformers import LlavaConfig, LlavaForConditionalGeneration, "
                                        "LlavaProcessor\n"
                                        "class EvilConfig(LlavaConfig): pass\n"
                                        "class Evil(LlavaForConditionalGeneration): pass\n"
                                        "class EvilProcessor(LlavaProcessor): pass\n")
    for name, key in (("config.json", "AutoModelForImageTextToText"), ("processor_config.json", "AutoProcessor")):
        path = checkpoint / name
        data = json.loads(path.read_text()) if path.exists() else {}
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig", key: "evil.Evil" if "Model" in key
                            else "evil.EvilProcessor"}
        path.write_text(json.dumps(data))
    settings = _settings("llava", local_path=str(checkpoint))
    assert settings.weights.trust_remote_code is False
    try:
        load_model(settings, CPU)
    except ModelLoadError as exc:  # refusing is fine too; running the code is not
        assert "trust_remote_code" in str(exc) or "remote code" in str(exc).lower(), exc
    assert not marker.exists()
    # The checkpoint really asks for its code: a model with trust_remote_code set runs it. In a process of its
    # own: remote code registers classes inside transformers, which later saves in this process would trip on.
    script = ("import torch; from triton_vlm.loading import load_model; from triton_vlm.config import ModelSettings; "
              f"load_model(ModelSettings(model_name='llava', family='llava').with_overrides("
              f"local_path={str(checkpoint)!r}, trust_remote_code=True), torch.device('cpu'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert marker.read_text() == "ran", result.stderr[-2000:]


def test_trust_remote_code_is_per_model_and_reaches_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    family = type(get_family("kosmos2"))

    def load(self: object, source: str, **kwargs: Any) -> tuple[Any, Any]:
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    monkeypatch.setattr(family, "load", load)
    params = {"model_family": "kosmos2"}
    for env, expected in (({}, False), ({"TRITON_VLM_KOSMOS2_TRUST_REMOTE_CODE": "true"}, True),
                          ({"TRITON_VLM_OTHER_TRUST_REMOTE_CODE": "true"}, False)):
        settings = read_settings("kosmos2", params, env=env)
        with pytest.raises(ModelLoadError):
            load_model(settings.with_overrides(tiny=True), CPU)
        assert seen[-1] is expected


def test_hf_token_is_never_part_of_a_load_failure(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    secret = "hf_unitTestSecretValue987654321"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runtime = VLMRuntime(_settings("llava", hf_model_id="someone/private-llava"), CPU)
    (error,) = runtime.generate([runtime.make_request(image_bytes(8, 8), "hi")])
    assert isinstance(error, ModelLoadError) and "someone/private-llava" in str(error)
    assert secret not in str(error) and secret not in repr(error.__cause__) and secret not in caplog.text


# -- prompt decoding, property-based --------------------------------------------------------------------------------
FUZZ = VLMRuntime(ModelSettings(model_name="fuzz", family="llava").with_overrides(tiny=True, max_image_pixels=10**6),
                  CPU)
FUZZ_IMAGE = image_bytes(8, 8)


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_prompt_is_accepted_as_text_or_refused_as_invalid(prompt: bytes | str) -> None:
    try:
        request = FUZZ.make_request(FUZZ_IMAGE, prompt, max_tokens=1)
    except InvalidInputError as exc:
        assert str(exc).startswith(("prompt:", "max_tokens"))
        return
    assert isinstance(request, GenerationRequest)
    text = request.prompt
    assert isinstance(text, str) and text.strip() and "\x00" not in text and len(text) <= RequestLimits().max_prompt_chars
    assert not any(token in text for token in get_family("llava").reserved_prompt_tokens)
    if isinstance(prompt, bytes):
        assert text == prompt.decode("utf-8")


@given(st.lists(st.sampled_from(["<", ">", "/", "s", "image", "pad", "unk", " ", "a", "\x00", "é"]),
                max_size=20).map("".join))
def test_token_like_prompts(prompt: str) -> None:
    reserved = get_family("llava").reserved_prompt_tokens
    try:
        FUZZ.make_request(FUZZ_IMAGE, prompt, max_tokens=1)
    except InvalidInputError as exc:
        assert ("reserved token" in str(exc)) == (any(t in prompt for t in reserved) and "\x00" not in prompt
                                                   and bool(prompt.strip()))
        return
    assert not any(t in prompt for t in reserved)


@given(max_tokens=st.integers(-2**40, 2**40), temperature=st.floats(allow_nan=True, allow_infinity=True),
       top_p=st.floats(allow_nan=True, allow_infinity=True), seed=st.integers(-2**70, 2**70))
def test_any_sampling_values_are_accepted_in_range_or_refused(max_tokens: int, temperature: float, top_p: float,
                                                              seed: int) -> None:
    try:
        request = FUZZ.make_request(FUZZ_IMAGE, "hi", max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed)
    except InvalidInputError as exc:
        assert str(exc).split()[0] in ("max_tokens", "temperature", "top_p", "seed"), exc
        return
    params = request.params
    assert 1 <= params.max_tokens <= 1024 and 0 <= params.temperature <= 100 and 0 < params.top_p <= 1
    assert math.isfinite(params.temperature) and 0 <= (params.seed or 0) < 2**63


def test_cli_queue_flags_reach_the_server_options() -> None:
    from triton_vlm.cli.main import _parser, _server_options

    options = _server_options(_parser().parse_args(["serve", "--max-queue-size", "3", "--queue-timeout-ms", "50",
                                                    "--batch-delay-us", "0"]))
    assert (options.max_queue_size, options.queue_timeout_ms, options.batch_delay_us) == (3, 50, 0)
    defaults = _server_options(_parser().parse_args(["serve"]))
    assert (defaults.max_queue_size, defaults.queue_timeout_ms, defaults.batch_delay_us, defaults.supervise) == (
        None, None, None, True)
