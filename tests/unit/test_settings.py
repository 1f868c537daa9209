"""triton_vlm.settings: config parameters, environment overrides, parsing and validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_vlm.errors import InvalidInputError
from triton_vlm.models import get_family
from triton_vlm.settings import (DTYPES, ModelSettings, env_prefix, parameters_from_json_config, parse_bool,
                                 read_config_parameters, tiny_mode)

from .helpers import REPOSITORY

BASE = {"model_family": "llava", "hf_model_id": "llava-hf/llava-1.5-7b-hf", "revision": "main", "local_path": "",
        "dtype": "auto", "device": "auto", "preload": "false", "trust_remote_code": "false",
        "default_max_tokens": "128", "max_tokens_limit": "1024"}


def settings(parameters: dict[str, str] | None = None, env: dict[str, str] | None = None,
             name: str = "llava") -> ModelSettings:
    return ModelSettings.from_parameters(name, BASE if parameters is None else parameters, env=env or {})


# -- from_parameters --------------------------------------------------------------------------------------
def test_from_parameters_reads_every_config_value() -> None:
    s = settings({**BASE, "dtype": "bfloat16", "device": "cuda:1", "preload": "true", "trust_remote_code": "yes",
                  "default_max_tokens": "64", "max_tokens_limit": "256", "local_path": " /w ", "revision": "r1"})
    assert s == ModelSettings(model_name="llava", family="llava", hf_model_id="llava-hf/llava-1.5-7b-hf",
                              revision="r1", local_path="/w", dtype="bfloat16", device="cuda:1", preload=True,
                              trust_remote_code=True, tiny=False, default_max_tokens=64, max_tokens_limit=256)
    assert isinstance(s.default_max_tokens, int) and isinstance(s.preload, bool)


def test_model_family_key_sets_family_and_unknown_keys_are_ignored() -> None:
    s = settings({"model_family": "kosmos2", "no_such_key": "x", "model_name": "other"}, name="my-kosmos")
    assert s.family == "kosmos2"
    assert s.model_name == "my-kosmos"  # a 'model_name' parameter never renames the model
    assert s.hf_model_id == "" and s.tiny is False and s.default_max_tokens == 128


def test_defaults_when_parameters_are_minimal() -> None:
    s = settings({"model_family": "llava"})
    assert (s.revision, s.dtype, s.device, s.preload, s.max_tokens_limit) == ("main", "auto", "auto", False, 1024)
    assert s.max_image_bytes == 20 * 1024 * 1024 and s.max_image_pixels == 40_000_000


def test_env_overrides_config_parameters() -> None:
    env = {"TRITON_VLM_LLAVA_HF_MODEL_ID": "me/my-llava", "TRITON_VLM_LLAVA_MAX_TOKENS_LIMIT": "2048",
           "TRITON_VLM_LLAVA_PRELOAD": "on", "TRITON_VLM_LLAVA_LOCAL_PATH": "/models/llava",
           "TRITON_VLM_LLAVA_MAX_IMAGE_PIXELS": "1000",
           "TRITON_VLM_KOSMOS2_HF_MODEL_ID": "not/for-llava"}  # another model's variable does nothing
    s = settings(env=env)
    assert s.hf_model_id == "me/my-llava"
    assert s.max_tokens_limit == 2048
    assert s.preload is True
    assert s.local_path == "/models/llava"
    assert s.max_image_pixels == 1000


def test_env_override_of_model_family_uses_the_model_family_name() -> None:
    s = settings(env={"TRITON_VLM_LLAVA_MODEL_FAMILY": "kosmos2", "TRITON_VLM_LLAVA_FAMILY": "ignored"})
    assert s.family == "kosmos2"


def test_env_prefix_follows_model_name_with_odd_characters() -> None:
    s = settings({"model_family": "llava"}, env={"TRITON_VLM_MY_MODEL_V2_DTYPE": "float16"}, name="my-model.v2")
    assert s.dtype == "float16"


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_LLAVA_DEFAULT_MAX_TOKENS", "7")
    assert ModelSettings.from_parameters("llava", BASE).default_max_tokens == 7
    # An explicit env mapping replaces os.environ entirely.
    assert ModelSettings.from_parameters("llava", BASE, env={}).default_max_tokens == 128


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False),
                                             ("no", False)])
def test_global_tiny_switch(value: str, expected: bool) -> None:
    assert settings(env={"TRITON_VLM_TINY": value}).tiny is expected
    assert tiny_mode({"TRITON_VLM_TINY": value}) is expected


def test_model_tiny_setting_beats_global_switch() -> None:
    assert settings(env={"TRITON_VLM_TINY": "1", "TRITON_VLM_LLAVA_TINY": "0"}).tiny is False
    assert settings({**BASE, "tiny": "false"}, env={"TRITON_VLM_TINY": "1"}).tiny is False
    assert settings({**BASE, "tiny": "true"}, env={}).tiny is True


def test_tiny_mode_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_TINY", "yes")
    assert tiny_mode() is True
    monkeypatch.delenv("TRITON_VLM_TINY")
    assert tiny_mode() is False


def test_bad_global_tiny_value_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match=r"TRITON_VLM_TINY: expected true/false, got 'maybe'"):
        settings(env={"TRITON_VLM_TINY": "maybe"})


@pytest.mark.parametrize("key", ["preload", "trust_remote_code", "tiny"])
def test_bad_bool_names_the_key_and_value(key: str) -> None:
    with pytest.raises(InvalidInputError, match=rf"{key}: expected true/false, got 'sometimes'"):
        settings({**BASE, key: "sometimes"})


INT_KEYS = ["default_max_tokens", "max_tokens_limit", "max_image_bytes", "max_image_pixels", "max_model_len",
            "max_num_seqs"]


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", ["12.5", "ten", "", "0x10"])
def test_bad_int_names_model_key_and_value(key: str, value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        settings({**BASE, key: value})
    message = str(info.value)
    assert "'llava'" in message and key in message and "must be a number" in message and repr(value) in message


@pytest.mark.parametrize("value", ["ten", "", "0x10", "85%"])
def test_bad_float_names_model_key_and_value(value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        settings({**BASE, "kv_cache_memory_fraction": value})
    assert str(info.value) == f"model 'llava': kv_cache_memory_fraction must be a number, got {value!r}"


def test_bad_int_from_env_is_reported_too() -> None:
    with pytest.raises(InvalidInputError, match="max_tokens_limit must be a number, got 'lots'"):
        settings(env={"TRITON_VLM_LLAVA_MAX_TOKENS_LIMIT": "lots"})


def test_engine_settings_parse_and_reach_the_engine_config() -> None:
    s = settings({**BASE, "max_model_len": " 512 ", "max_num_seqs": "8", "kv_cache_memory_fraction": "0.5",
                  "cuda_graphs": "false"}, env={"TRITON_VLM_LLAVA_MAX_NUM_SEQS": "4"})
    assert (s.max_model_len, s.max_num_seqs, s.kv_cache_memory_fraction, s.cuda_graphs) == (512, 4, 0.5, False)
    assert isinstance(s.kv_cache_memory_fraction, float) and isinstance(s.max_num_seqs, int)
    engine = s.engine_config()
    assert (engine.max_model_len, engine.max_num_seqs, engine.kv_cache_memory_fraction, engine.cuda_graphs) == (
        512, 4, 0.5, False)


def test_engine_settings_defaults() -> None:
    s = settings()
    assert (s.max_model_len, s.max_num_seqs, s.kv_cache_memory_fraction, s.cuda_graphs) == (2048, 64, 0.85, True)


def test_int_values_tolerate_whitespace() -> None:
    assert settings({**BASE, "default_max_tokens": " 32 "}).default_max_tokens == 32


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, fragment", [
    ({"model_family": ""}, "parameter 'model_family' is required"),
    ({"model_family": "   "}, "parameter 'model_family' is required"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"dtype": "fp16"}, "got 'fp16'"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda[:N]"),
    ({"device": "gpu:0"}, "device must be auto, cpu or cuda[:N]"),
    ({"default_max_tokens": "0"}, "need 1 <= default_max_tokens <= max_tokens_limit, got 0 and 1024"),
    ({"default_max_tokens": "2000"}, "got 2000 and 1024"),
    ({"max_tokens_limit": "-1", "default_max_tokens": "-5"}, "default_max_tokens"),
    ({"max_image_bytes": "0"}, "max_image_bytes must be positive"),
    ({"max_image_pixels": "-3"}, "max_image_pixels must be positive"),
    ({"stream_interval": "0"}, "stream_interval must be >= 1"),
])
def test_validation_errors_are_clear(changes: dict[str, str], fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        settings({**BASE, **changes})
    assert fragment in str(info.value)
    assert "'llava'" in str(info.value)


def test_missing_family_is_an_error() -> None:
    with pytest.raises(InvalidInputError) as info:
        settings({"hf_model_id": "x/y"})
    assert str(info.value) == "model 'llava': parameter 'model_family' is required"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices(device: str) -> None:
    assert settings({**BASE, "device": device}).device == device


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_dtypes(dtype: str) -> None:
    assert settings({**BASE, "dtype": dtype}).dtype == dtype


def test_with_overrides_validates_and_keeps_the_rest() -> None:
    s = settings()
    t = s.with_overrides(tiny=True, max_tokens_limit=10, default_max_tokens=5)
    assert (t.tiny, t.max_tokens_limit, t.default_max_tokens, t.hf_model_id) == (True, 10, 5, s.hf_model_id)
    assert s.tiny is False  # frozen original untouched
    with pytest.raises(InvalidInputError):
        s.with_overrides(dtype="int8")


# -- parse_bool / env_prefix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "TRUE", " Yes ", "on", True])
def test_parse_bool_true(value: object) -> None:
    assert parse_bool(value, name="x") is True  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "OFF", "", "  ", False])
def test_parse_bool_false(value: object) -> None:
    assert parse_bool(value, name="x") is False  # type: ignore[arg-type]


@given(st.text(max_size=12))
def test_parse_bool_property(value: str) -> None:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        assert parse_bool(value, name="flag") is True
    elif lowered in {"0", "false", "no", "off", ""}:
        assert parse_bool(value, name="flag") is False
    else:
        with pytest.raises(InvalidInputError, match="^flag: expected true/false"):
            parse_bool(value, name="flag")


@given(st.one_of(st.integers(min_value=-10**6, max_value=10**6).map(str), st.text(max_size=8)))
def test_int_parameter_parsing_property(value: str) -> None:
    """Any string either becomes the integer it spells or an InvalidInputError; nothing else escapes."""
    try:
        expected: int | None = int(value)
    except ValueError:
        expected = None
    params = {"model_family": "llava", "max_tokens_limit": "100000", "default_max_tokens": "1",
              "max_image_pixels": value}
    if expected is not None and expected > 0:
        assert settings(params).max_image_pixels == expected
    else:
        with pytest.raises(InvalidInputError):
            settings(params)


@pytest.mark.parametrize("name, prefix", [
    ("llava", "TRITON_VLM_LLAVA_"), ("kosmos2", "TRITON_VLM_KOSMOS2_"), ("my-model.v2", "TRITON_VLM_MY_MODEL_V2_"),
    ("Moon Dream", "TRITON_VLM_MOON_DREAM_"),
])
def test_env_prefix(name: str, prefix: str) -> None:
    assert env_prefix(name) == prefix


# -- config files ---------------------------------------------------------------------------------------------
CONFIGS = sorted(REPOSITORY.glob("*/config.pbtxt"))


PUBLIC = ["kosmos2", "llava", "moondream2", "smolvlm"]
#: Public models whose family is not their name (made by `triton-vlm add-model`).
FAMILY_OF = {"smolvlm": "auto"}


def test_repository_has_the_public_models_and_the_engine_companions() -> None:
    assert [c.parent.name for c in CONFIGS] == ["kosmos2", "kosmos2_stream", "llava", "llava_stream", "moondream2",
                                                "moondream2_stream", "smolvlm"]
    assert [c.parent.name for c in CONFIGS if "model_family" in read_config_parameters(c)[1]] == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_read_config_parameters_of_real_configs(name: str) -> None:
    config = REPOSITORY / name / "config.pbtxt"
    family = FAMILY_OF.get(name, name)
    read_name, parameters = read_config_parameters(config)
    assert read_name == name
    assert parameters["model_family"] == family
    assert all(isinstance(v, str) for v in parameters.values())
    s = ModelSettings.from_parameters(name, parameters, env={})
    assert s.family == family
    assert s.hf_model_id == get_family(family).default_hf_model_id
    assert (s.dtype, s.device, s.preload, s.trust_remote_code, s.tiny) == ("auto", "auto", False, False, False)
    assert s.revision == ("2025-06-21" if name == "moondream2" else "main")  # moondream2 pins its release
    assert (s.default_max_tokens, s.max_tokens_limit) == (128, 1024)


def test_llava_stream_settings_combine_base_and_engine_parameters() -> None:
    """As the stream backend does: llava's parameters, overridden by llava_stream's own."""
    name, parameters = read_config_parameters(REPOSITORY / "llava_stream" / "config.pbtxt")
    assert name == "llava_stream" and parameters["base_model"] == "llava" and "model_family" not in parameters
    with pytest.raises(InvalidInputError, match="parameter 'model_family' is required"):
        ModelSettings.from_parameters(name, parameters, env={})  # alone it names no family
    _, base = read_config_parameters(REPOSITORY / "llava" / "config.pbtxt")
    env = {"TRITON_VLM_LLAVA_DTYPE": "float16", "TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS": "16"}
    s = ModelSettings.from_parameters(name, {**base, **parameters}, env=env, env_aliases=("llava",))
    assert (s.model_name, s.family, s.hf_model_id) == ("llava_stream", "llava", "llava-hf/llava-1.5-7b-hf")
    assert s.dtype == "float16"  # the base model's variables apply to its companion
    assert (s.max_model_len, s.max_num_seqs, s.kv_cache_memory_fraction, s.cuda_graphs) == (2048, 16, 0.85, True)
    assert s.stream_interval == 1  # every token its own delta, unless told otherwise
    assert s.engine_config().max_prefill_tokens == 4096
    env["TRITON_VLM_LLAVA_STREAM_STREAM_INTERVAL"] = "8"
    env["TRITON_VLM_LLAVA_STREAM_MAX_PREFILL_TOKENS"] = "1024"
    s = ModelSettings.from_parameters(name, {**base, **parameters}, env=env, env_aliases=("llava",))
    assert s.stream_interval == 8 and s.engine_config().max_prefill_tokens == 1024


def test_read_config_parameters_falls_back_to_directory_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "unnamed"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(
        'backend: "python"\nparameters { key: "model_family" value: { string_value: "llava" } }\n')
    assert read_config_parameters(model_dir / "config.pbtxt") == ("unnamed", {"model_family": "llava"})


def test_parameters_from_json_config() -> None:
    config = {"parameters": {"model_family": {"string_value": "kosmos2"}, "preload": {"string_value": "true"},
                             "odd": {}}}
    assert parameters_from_json_config(config) == {"model_family": "kosmos2", "preload": "true", "odd": ""}
    assert parameters_from_json_config({}) == {}
    assert parameters_from_json_config({"parameters": None}) == {}


def test_engine_queue_bound_from_the_config_and_the_environment() -> None:
    """An engine model's max_queue_size is its own bound on waiting requests: the stream config's parameter, the
    base model's environment, then its own (which wins)."""
    _, parameters = read_config_parameters(REPOSITORY / "llava_stream" / "config.pbtxt")
    parameters = {**parameters, "model_family": "llava"}

    def bound(env: dict[str, str]) -> int:
        return ModelSettings.from_parameters("llava_stream", parameters, env=env, env_aliases=("llava",)).max_queue_size

    assert bound({}) == 256
    assert bound({"TRITON_VLM_LLAVA_MAX_QUEUE_SIZE": "10"}) == 10
    assert bound({"TRITON_VLM_LLAVA_MAX_QUEUE_SIZE": "10", "TRITON_VLM_LLAVA_STREAM_MAX_QUEUE_SIZE": "0"}) == 0
    with pytest.raises(InvalidInputError, match="max_queue_size must be >= 0"):
        ModelSettings.from_parameters("llava_stream", {**parameters, "max_queue_size": "-1"}, env={})
