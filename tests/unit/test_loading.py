"""triton_vlm.loading: weights sources, error messages, device and dtype resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from triton_vlm.errors import ModelLoadError
from triton_vlm.generation import GenerationOutput
from triton_vlm.loading import hub_offline, load_model, resolve_device, resolve_dtype
from triton_vlm.runtime import VLMRuntime
from triton_vlm.settings import ModelSettings, read_config_parameters
from triton_vlm.tiny import ensure_tiny_checkpoint

from .helpers import REPOSITORY, image_bytes

CPU = torch.device("cpu")


def real_settings(model: str) -> ModelSettings:
    name, parameters = read_config_parameters(REPOSITORY / model / "config.pbtxt")
    return ModelSettings.from_parameters(name, parameters, env={})


# -- missing weights ------------------------------------------------------------------------------------------
def test_offline_missing_llava_weights_explain_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    settings = real_settings("llava")
    assert not settings.tiny and not settings.local_path
    with pytest.raises(ModelLoadError) as info:
        load_model(settings, CPU)
    message = str(info.value)
    assert "llava-hf/llava-1.5-7b-hf" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "TRITON_VLM_LLAVA_LOCAL_PATH" in message
    assert "HF_HOME" in message and str(tmp_path / "hf-home") in message
    assert "--tiny" in message
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf" in message


def test_offline_missing_kosmos_weights_name_their_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="microsoft/kosmos-2-patch14-224.*TRITON_VLM_KOSMOS2_LOCAL_PATH"):
        load_model(real_settings("kosmos2"), CPU)


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


def test_unsupported_family_refuses_to_load() -> None:
    with pytest.raises(ModelLoadError, match="family 'moondream2' cannot be served yet"):
        load_model(real_settings("moondream2"), CPU)


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
    assert kosmos2_runtime.settings.tiny


def test_dtype_setting_is_applied(tmp_path: Path) -> None:
    loaded = load_model(real_settings("kosmos2").with_overrides(tiny=True, dtype="bfloat16"), CPU)
    assert loaded.dtype == torch.bfloat16 and loaded.model.dtype == torch.bfloat16


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "src bug: loading.py _missing_weights_message treats every local_only load as hub offline mode, so a "
    "local_path checkpoint without weights is reported as 'offline mode (HF_HUB_OFFLINE=1) found no cached "
    "copy' and suggests `huggingface-cli download <the local path>`"))
def test_local_path_without_weights_message_is_about_the_directory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "no-weights"
    shutil.copytree(ensure_tiny_checkpoint("kosmos2"), checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(real_settings("kosmos2").with_overrides(local_path=str(checkpoint)), CPU)
    message = str(info.value)
    assert str(checkpoint) in message
    assert "huggingface-cli download " + str(checkpoint) not in message
    assert "offline mode" not in message


def corrupt_checkpoint(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "corrupt"
    shutil.copytree(ensure_tiny_checkpoint("kosmos2"), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    return checkpoint


@pytest.mark.xfail(strict=True, raises=SafetensorError, reason=(
    "src bug: loading.py load_model converts only OSError/ValueError to ModelLoadError; a truncated "
    "model.safetensors raises safetensors' SafetensorError, which escapes load_model"))
def test_truncated_weights_are_a_model_load_error(tmp_path: Path) -> None:
    settings = real_settings("kosmos2").with_overrides(local_path=str(corrupt_checkpoint(tmp_path)))
    with pytest.raises(ModelLoadError):
        load_model(settings, CPU)


@pytest.mark.xfail(strict=True, raises=SafetensorError, reason=(
    "src bug: runtime.py VLMRuntime.generate catches only TritonVLMError from ensure_loaded, so a load that "
    "fails with another exception (truncated model.safetensors -> SafetensorError) raises out of generate "
    "(and out of the backend's execute, failing the whole batch) instead of returning per-request errors"))
def test_generate_with_truncated_weights_returns_errors(tmp_path: Path) -> None:
    settings = real_settings("kosmos2").with_overrides(local_path=str(corrupt_checkpoint(tmp_path)))
    runtime = VLMRuntime(settings, CPU)
    request = runtime.make_request(image_bytes(8, 8), "hi", max_tokens=2)
    results = runtime.generate([request, request])
    assert len(results) == 2 and not any(isinstance(r, GenerationOutput) for r in results)


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
