"""triton_vlm.loading: weights sources, error messages, device and dtype resolution."""

from __future__ import annotations

import shutil
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from triton_vlm.config import ModelSettings, read_config_file, read_settings
from triton_vlm.errors import ModelLoadError
from triton_vlm.hub import hub_endpoint, hub_reachable
from triton_vlm.loading import hub_offline, load_model, resolve_device, resolve_dtype
from triton_vlm.models import get_family
from triton_vlm.runtime import VLMRuntime
from triton_vlm.tiny import ensure_tiny_checkpoint

from .helpers import REPOSITORY, free_port, image_bytes

CPU = torch.device("cpu")


def real_settings(model: str) -> ModelSettings:
    return read_settings(*read_config_file(REPOSITORY / model / "config.pbtxt"), env={})


# -- missing weights ------------------------------------------------------------------------------------------
def test_offline_missing_llava_weights_explain_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    settings = real_settings("llava")
    assert not settings.weights.tiny and not settings.weights.local_path
    with pytest.raises(ModelLoadError) as info:
        load_model(settings, CPU)
    message = str(info.value)
    assert "llava-hf/llava-1.5-7b-hf" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "TRITON_VLM_LLAVA_LOCAL_PATH" in message
    assert "HF_HOME" in message and str(tmp_path / "hf-home") in message
    assert "--tiny" in message
    assert "hf download llava-hf/llava-1.5-7b-hf" in message


def test_offline_missing_kosmos_weights_name_their_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="microsoft/kosmos-2-patch14-224.*TRITON_VLM_KOSMOS2_LOCAL_PATH"):
        load_model(real_settings("kosmos2"), CPU)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub mode (the unit tests run offline), with no proxy to go through."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)


def test_hub_reachable_probes_the_endpoint(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}/")
        assert hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert not hub_reachable(timeout=2)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub_reachable(timeout=2)  # through a proxy, huggingface_hub decides


def test_a_hub_probe_that_hangs_counts_as_unreachable(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that hangs (the name lookup has no timeout of its own) does not hold up the load."""
    release = threading.Event()
    connect = socket.create_connection
    hub_host = urllib.parse.urlsplit(hub_endpoint()).hostname

    def hanging(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        if address[0] != hub_host:  # other threads of the test process (a server's watchdog) connect as usual
            return connect(address, *args, **kwargs)  # type: ignore[arg-type]
        release.wait(10)
        return socket.socket()

    monkeypatch.setattr(socket, "create_connection", hanging)
    try:
        assert not hub_reachable(timeout=0.2)
    finally:
        release.set()


def test_an_unreachable_hub_means_the_cache_alone_and_a_clear_error(
        online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without network the load does not wait out huggingface_hub's retries (about 25 s a file): it reads the
    cache only, and the error says the Hub was out of reach."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    family = get_family("llava")
    calls: list[bool] = []

    def load(source: str, **kwargs: object) -> object:
        calls.append(bool(kwargs["local_files_only"]))
        return type(family).load(family, source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(family, "load", load)
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("llava"), CPU)
    assert calls == [True]
    message = str(info.value)
    assert f"the Hugging Face Hub ({endpoint}) could not be reached and no cached copy was found" in message
    assert "HF_HUB_OFFLINE" not in message and "hf download llava-hf/llava-1.5-7b-hf" in message


def test_hf_model_id_override_is_the_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = real_settings("llava").with_overrides(hf_model_id="someone/other-llava", revision="v2")
    with pytest.raises(ModelLoadError, match=r"'someone/other-llava' \(revision v2\)"):
        load_model(settings, CPU)


def test_bad_local_path_is_a_clear_error(tmp_path: Path) -> None:
    settings = real_settings("llava").with_overrides(local_path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError) as info:
        load_model(settings, CPU)
    message = str(info.value)
    assert "local_path" in message and str(tmp_path / "nowhere") in message
    assert "no config.json" in message and "'llava'" in message


def test_local_path_to_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
        load_model(real_settings("kosmos2").with_overrides(local_path=str(file)), CPU)


def test_unsupported_family_refuses_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # moondream2 is served natively since the moondream2 merge; a family marked unsupported is still refused.
    monkeypatch.setattr(type(get_family("kosmos2")), "supported", False)
    with pytest.raises(ModelLoadError, match="family 'kosmos2' cannot be served yet"):
        load_model(real_settings("kosmos2"), CPU)


# -- successful loads ------------------------------------------------------------------------------------------
def test_local_path_loads_a_checkpoint_directory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-kosmos"
    shutil.copytree(ensure_tiny_checkpoint("kosmos2"), checkpoint)
    loaded = load_model(real_settings("kosmos2").with_overrides(local_path=str(checkpoint)), CPU)
    assert loaded.source == str(checkpoint)
    assert loaded.family.name == "kosmos2" and loaded.device == CPU and loaded.dtype == torch.float32
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.load_seconds >= 0


def test_tiny_loads_from_the_tiny_cache(kosmos2_runtime: VLMRuntime) -> None:
    loaded = kosmos2_runtime.ensure_loaded()
    assert loaded.source == str(ensure_tiny_checkpoint("kosmos2"))
    assert kosmos2_runtime.settings.weights.tiny


def test_dtype_setting_is_applied(tmp_path: Path) -> None:
    loaded = load_model(real_settings("kosmos2").with_overrides(tiny=True, dtype="bfloat16"), CPU)
    assert loaded.dtype == torch.bfloat16 and loaded.model.dtype == torch.bfloat16


def test_local_path_without_weights_message_is_about_the_directory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "no-weights"
    shutil.copytree(ensure_tiny_checkpoint("kosmos2"), checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("kosmos2").with_overrides(local_path=str(checkpoint)), CPU)
    message = str(info.value)
    assert str(checkpoint) in message
    assert "hf download " + str(checkpoint) not in message
    assert "offline mode" not in message and "HF_HUB_OFFLINE" not in message
    assert "local_path" in message and "model.safetensors" in message
    assert "TRITON_VLM_KOSMOS2_LOCAL_PATH" in message
    assert "Cause: OSError" in message


def test_local_path_with_unusable_processor_files_is_about_the_directory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "half-copied"
    shutil.copytree(ensure_tiny_checkpoint("llava"), checkpoint)
    for name in ("config.json", "model.safetensors"):  # config.json is there, so _weights_source accepts it
        assert (checkpoint / name).is_file()
    for path in checkpoint.iterdir():
        if path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            path.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("llava").with_overrides(local_path=str(checkpoint)), CPU)
    message = str(info.value)
    assert f"local_path {str(checkpoint)!r}" in message
    assert "offline mode" not in message and "hf download" not in message


def corrupt_checkpoint(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "corrupt"
    shutil.copytree(ensure_tiny_checkpoint("kosmos2"), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    return checkpoint


def test_truncated_weights_are_a_model_load_error(tmp_path: Path) -> None:
    checkpoint = corrupt_checkpoint(tmp_path)
    settings = real_settings("kosmos2").with_overrides(local_path=str(checkpoint))
    with pytest.raises(ModelLoadError) as info:
        load_model(settings, CPU)
    message = str(info.value)
    assert isinstance(info.value.__cause__, SafetensorError)
    assert str(checkpoint) in message and "corrupt or incomplete" in message
    assert "Cause: SafetensorError" in message
    assert "offline mode" not in message


def test_generate_with_truncated_weights_returns_errors(tmp_path: Path) -> None:
    settings = real_settings("kosmos2").with_overrides(local_path=str(corrupt_checkpoint(tmp_path)))
    runtime = VLMRuntime(settings, CPU)
    request = runtime.make_request(image_bytes(8, 8), "hi", max_tokens=2)
    results = runtime.generate([request, request])
    assert len(results) == 2 and all(isinstance(r, ModelLoadError) for r in results)
    assert runtime.loaded is None  # nothing cached: the next call tries again (and fails again)
    assert all(isinstance(r, ModelLoadError) for r in runtime.generate([request]))
    with pytest.raises(ModelLoadError):
        runtime.ensure_loaded()


class _Boom(Exception):
    """An exception type no loader code knows about."""


def _failing_load(exc: BaseException):  # type: ignore[no-untyped-def]
    def load(*args: object, **kwargs: object) -> None:
        raise exc
    return load


@pytest.mark.parametrize("exc", [_Boom("something odd"), RuntimeError("size mismatch for lm_head.weight"),
                                 KeyError("vision_config"), ImportError("no module named flash_attn")])
def test_any_load_failure_is_a_model_load_error(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    family = get_family("kosmos2")
    monkeypatch.setattr(family, "load", _failing_load(exc))
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("kosmos2").with_overrides(tiny=True), CPU)
    assert info.value.__cause__ is exc
    assert f"Cause: {type(exc).__name__}" in str(info.value)
    assert "tiny checkpoint" in str(info.value)


def test_corrupt_hub_cache_suggests_downloading_again(monkeypatch: pytest.MonkeyPatch) -> None:
    family = get_family("kosmos2")
    monkeypatch.setattr(family, "load", _failing_load(SafetensorError("Error while deserializing header")))
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("kosmos2"), CPU)
    message = str(info.value)
    assert "'microsoft/kosmos-2-patch14-224'" in message and "corrupt or incomplete" in message
    assert "hf download microsoft/kosmos-2-patch14-224 --force-download" in message


def test_cuda_out_of_memory_stays_distinct(monkeypatch: pytest.MonkeyPatch) -> None:
    family = get_family("kosmos2")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(family, "load", _failing_load(oom))
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("kosmos2").with_overrides(tiny=True), CPU)
    message = str(info.value)
    assert "out of GPU memory" in message and "Tried to allocate 2.00 GiB" in message
    assert "corrupt" not in message and "offline" not in message


def test_failing_tiny_build_is_a_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton_vlm.tiny

    def no_space(family: str, root: object = None) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton_vlm.tiny, "ensure_tiny_checkpoint", no_space)
    with pytest.raises(ModelLoadError, match="cannot prepare the weights.*No space left on device"):
        load_model(real_settings("kosmos2").with_overrides(tiny=True), CPU)


def test_runtime_never_raises_for_a_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever load_model raises, generate answers every request with a ModelLoadError."""
    import triton_vlm.runtime

    calls = []

    def broken(settings: ModelSettings, device: torch.device) -> None:
        calls.append(settings.model_name)
        raise _Boom("unexpected")

    monkeypatch.setattr(triton_vlm.runtime, "load_model", broken)
    runtime = VLMRuntime(real_settings("kosmos2").with_overrides(tiny=True), CPU)
    request = runtime.make_request(image_bytes(8, 8), "hi", max_tokens=2)
    results = runtime.generate([request, request, request])
    assert len(results) == 3 and all(isinstance(r, ModelLoadError) for r in results)
    assert "_Boom: unexpected" in str(results[0])
    with pytest.raises(ModelLoadError):
        runtime.ensure_loaded()
    assert len(calls) == 2  # not cached: every call tries again


# -- resolve_device / resolve_dtype / hub_offline -------------------------------------------------------------
def settings_with(**changes: object) -> ModelSettings:
    return ModelSettings(model_name="m", family="llava").with_overrides(**changes)


@pytest.mark.parametrize("kind", ["CPU", "GPU", "gpu", "MODEL"])
def test_auto_device_without_cuda_is_cpu(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(settings_with(), kind, 1) == CPU


def test_auto_device_follows_gpu_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(settings_with(), "GPU", 2) == torch.device("cuda", 2)
    assert resolve_device(settings_with(), "gpu", 0) == torch.device("cuda", 0)
    assert resolve_device(settings_with(), "CPU", 2) == CPU
    assert resolve_device(settings_with()) == CPU


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda:3")])
def test_explicit_device_wins(device: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(settings_with(device=device), "GPU", 1) == torch.device(expected)


@pytest.mark.parametrize("dtype, device, expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.float16), ("float32", "cuda", torch.float32),
    ("float16", "cpu", torch.float16), ("bfloat16", "cuda", torch.bfloat16),
])
def test_resolve_dtype(dtype: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(settings_with(dtype=dtype), torch.device(device)) == expected


@pytest.mark.parametrize("env, expected", [
    ({}, False), ({"HF_HUB_OFFLINE": "1"}, True), ({"TRANSFORMERS_OFFLINE": "yes"}, True),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}, False),
])
def test_hub_offline(env: dict[str, str], expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hub_offline() is expected


def test_missing_weights_message_for_a_directory_never_suggests_downloading_it(tmp_path: Path) -> None:
    from triton_vlm.loading import _missing_weights_message

    cause = OSError("Error no file named model.safetensors found in directory")
    local = real_settings("llava").with_overrides(local_path=str(tmp_path))
    message = _missing_weights_message(local, str(tmp_path), None, cause)
    assert f"local_path {str(tmp_path)!r}" in message and "TRITON_VLM_LLAVA_LOCAL_PATH" in message
    assert "offline mode" not in message and "hf download" not in message
    tiny = real_settings("llava").with_overrides(tiny=True)
    message = _missing_weights_message(tiny, str(tmp_path), None, cause)
    assert "tiny checkpoint" in message and "offline mode" not in message
    # A hub id keeps the hub advice.
    hub = _missing_weights_message(real_settings("llava"), "llava-hf/llava-1.5-7b-hf", "main", cause)
    assert "offline mode (HF_HUB_OFFLINE=1)" in hub and "hf download llava-hf/llava-1.5-7b-hf" in hub
