"""triton_vlm.config: the schema's defaults and validation, the one reader (parameters, environment overrides,
errors that name the key and its source), the repository's configs read through it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_vlm.config import (
    DTYPES,
    BatchingConfig,
    ConfigError,
    EngineConfig,
    ModelSettings,
    RequestLimits,
    WeightsConfig,
    env_prefix,
    parse_bool,
    read_batching,
    read_config_file,
    read_settings,
    settings_from_triton_args,
    string_parameters,
    tiny_mode,
)
from triton_vlm.errors import InvalidInputError
from triton_vlm.models import get_family

from .helpers import REPOSITORY

BASE = {"model_family": "llava", "hf_model_id": "llava-hf/llava-1.5-7b-hf"}


def settings(parameters: dict[str, str] | None = None, env: dict[str, str] | None = None,
             name: str = "llava") -> ModelSettings:
    return read_settings(name, BASE if parameters is None else parameters, env=env or {})


# -- the schema: defaults and validation ------------------------------------------------------------------------------
def test_the_schema_holds_the_defaults() -> None:
    s = settings({"model_family": "llava"})
    assert s == ModelSettings(model_name="llava", family="llava")
    assert s.weights == WeightsConfig(hf_model_id="", revision="main", local_path="", dtype="auto", device="auto",
                                      preload=False, trust_remote_code=False, tiny=False)
    assert s.limits == RequestLimits(default_max_tokens=128, max_tokens_limit=1024, max_prompt_chars=16_000,
                                     max_image_bytes=20 * 1024 * 1024, max_image_pixels=40_000_000,
                                     max_image_aspect_ratio=100.0)
    assert s.engine == EngineConfig(max_model_len=2048, max_num_seqs=64, max_queue_size=256, max_prefill_tokens=4096,
                                    kv_cache_memory_fraction=0.85, cuda_graphs=True, graph_len_step=256,
                                    quantization="none", kv_cache_dtype="auto", stream_interval=1)
    assert BatchingConfig() == BatchingConfig(max_queue_size=None, queue_timeout_ms=None, batch_delay_us=None)
    assert s.base_model == ""


def test_sections_are_frozen() -> None:
    s = settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.weights.dtype = "float16"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.engine = EngineConfig()  # type: ignore[misc]


@pytest.mark.parametrize("section, kwargs, key, fragment", [
    (WeightsConfig, {"dtype": "float64"}, "dtype", "dtype must be one of"),
    (WeightsConfig, {"device": "cudax"}, "device", "device must be auto, cpu or cuda[:N]"),
    (RequestLimits, {"default_max_tokens": 0}, "default_max_tokens", "need 1 <= default_max_tokens"),
    (RequestLimits, {"max_prompt_chars": 0}, "max_prompt_chars", "max_prompt_chars must be positive"),
    (RequestLimits, {"max_image_aspect_ratio": float("nan")}, "max_image_aspect_ratio", "must be >= 1"),
    (BatchingConfig, {"queue_timeout_ms": -1}, "queue_timeout_ms", "queue_timeout_ms must be >= 0"),
    (EngineConfig, {"max_queue_size": -1}, "max_queue_size", "max_queue_size must be >= 0 (0: no bound), got -1"),
    (EngineConfig, {"stream_interval": 0}, "stream_interval", "stream_interval must be >= 1"),
    (EngineConfig, {"quantization": "int4"}, "quantization", "quantization must be one of ('none', 'fp8')"),
    (EngineConfig, {"prepare_workers": -1}, "prepare_workers", "prepare_workers must be >= 0 (0: by the host's"),
])
def test_sections_validate_on_construction(section: type, kwargs: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        section(**kwargs)
    assert info.value.key == key and fragment in str(info.value)
    assert isinstance(info.value, InvalidInputError)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 4)])
def test_prepare_workers_by_default_take_a_quarter_of_the_cores_up_to_four(
        monkeypatch: pytest.MonkeyPatch, cores: int, threads: int) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert EngineConfig().prepare_threads() == threads
    assert EngineConfig(prepare_workers=3).prepare_threads() == 3  # as set, whatever the host


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_dtypes(dtype: str) -> None:
    assert settings({**BASE, "dtype": dtype}).weights.dtype == dtype


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices(device: str) -> None:
    assert settings({**BASE, "device": device}).weights.device == device


def test_with_overrides_by_key_validates_and_keeps_the_rest() -> None:
    s = settings()
    t = s.with_overrides(tiny=True, max_tokens_limit=10, default_max_tokens=5, max_num_seqs=4)
    assert (t.weights.tiny, t.limits.max_tokens_limit, t.limits.default_max_tokens, t.engine.max_num_seqs) == (
        True, 10, 5, 4)
    assert t.weights.hf_model_id == s.weights.hf_model_id and s.weights.tiny is False  # the original is untouched
    with pytest.raises(ConfigError, match="dtype must be one of"):
        s.with_overrides(dtype="int8")
    with pytest.raises(ConfigError, match="unknown setting 'no_such_key'"):
        s.with_overrides(no_such_key=1)
    assert s.with_overrides(family="kosmos2").family == "kosmos2"


# -- the reader: parameters ---------------------------------------------------------------------------------------------
def test_parameters_fill_every_section_with_typed_values() -> None:
    s = settings({**BASE, "dtype": "bfloat16", "device": "cuda:1", "preload": "true", "trust_remote_code": "yes",
                  "default_max_tokens": "64", "max_tokens_limit": "256", "local_path": " /w ", "revision": "r1",
                  "max_model_len": " 512 ", "kv_cache_memory_fraction": "0.5", "cuda_graphs": "false"})
    assert s.weights == WeightsConfig(hf_model_id="llava-hf/llava-1.5-7b-hf", revision="r1", local_path="/w",
                                      dtype="bfloat16", device="cuda:1", preload=True, trust_remote_code=True)
    assert (s.limits.default_max_tokens, s.limits.max_tokens_limit) == (64, 256)
    assert (s.engine.max_model_len, s.engine.kv_cache_memory_fraction, s.engine.cuda_graphs) == (512, 0.5, False)
    assert isinstance(s.limits.default_max_tokens, int) and isinstance(s.engine.kv_cache_memory_fraction, float)


@pytest.mark.parametrize("key, hint", [
    ("max_model_length", "did you mean 'max_model_len'?"),
    ("model_name", "did you mean 'model_family'?"),
    ("colour", "known keys: base_model, cuda_graphs,"),
])
def test_an_unknown_parameter_is_an_error_naming_it(key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings({**BASE, key: "x"})
    assert str(info.value).startswith(f"model 'llava': unknown parameter {key!r} in its config.pbtxt; {hint}")
    assert (info.value.key, info.value.source) == (key, f"parameter {key!r}")


def test_parameters_read_elsewhere_are_not_settings() -> None:
    s = settings({**BASE, "forward_to": "llava_stream", "EXECUTION_ENV_PATH": "/envs/x.tar.gz"})
    assert s == settings()


@pytest.mark.parametrize("key", ["queue_timeout_ms", "batch_delay_us"])
def test_triton_batching_is_not_a_parameter(key: str) -> None:
    with pytest.raises(ConfigError, match=f"parameter '{key}' is not read from config.pbtxt: set Triton's "
                                          f"dynamic_batching there, or TRITON_VLM_LLAVA_{key.upper()}"):
        settings({**BASE, key: "5"})


def test_model_family_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        settings({"hf_model_id": "x/y"})
    assert str(info.value) == "model 'llava': parameter 'model_family' is required"
    with pytest.raises(ConfigError, match="parameter 'model_family' is required"):
        settings({"model_family": "  "})


# -- the reader: errors name the key and where its value came from -----------------------------------------------------
@pytest.mark.parametrize("key", ["default_max_tokens", "max_tokens_limit", "max_image_bytes", "max_image_pixels",
                                 "max_prompt_chars", "max_model_len", "max_num_seqs", "max_queue_size"])
@pytest.mark.parametrize("value", ["12.5", "ten", "", "0x10"])
def test_a_bad_int_names_model_key_value_and_parameter(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings({**BASE, key: value})
    assert str(info.value) == f"model 'llava': {key} must be a number, got {value!r} (from parameter {key!r})"
    assert (info.value.key, info.value.source) == (key, f"parameter {key!r}")


@pytest.mark.parametrize("value", ["ten", "", "85%"])
def test_a_bad_float_from_the_environment_names_the_variable(value: str) -> None:
    variable = "TRITON_VLM_LLAVA_KV_CACHE_MEMORY_FRACTION"
    with pytest.raises(ConfigError) as info:
        settings(env={variable: value})
    assert str(info.value) == (f"model 'llava': kv_cache_memory_fraction must be a number, got {value!r} "
                               f"(from {variable})")
    assert info.value.source == variable


@pytest.mark.parametrize("changes, fragment, source", [
    ({"dtype": "fp16"}, "dtype must be one of ('auto', 'float32', 'float16', 'bfloat16'), got 'fp16'",
     "parameter 'dtype'"),
    ({"device": "gpu:0"}, "device must be auto, cpu or cuda[:N], got 'gpu:0'", "parameter 'device'"),
    ({"max_image_bytes": "0"}, "max_image_bytes must be positive", "parameter 'max_image_bytes'"),
    ({"stream_interval": "0"}, "stream_interval must be >= 1", "parameter 'stream_interval'"),
    ({"kv_cache_dtype": "fp16"}, "kv_cache_dtype must be one of ('auto', 'fp8')", "parameter 'kv_cache_dtype'"),
    # A check across two keys names the sources that were set.
    ({"max_tokens_limit": "64"}, "need 1 <= default_max_tokens <= max_tokens_limit, got 128 and 64",
     "parameter 'max_tokens_limit'"),
])
def test_a_value_the_schema_refuses_names_model_key_and_source(changes: dict[str, str], fragment: str,
                                                                source: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings({**BASE, **changes})
    assert str(info.value).startswith("model 'llava': ") and fragment in str(info.value)
    assert str(info.value).endswith(f"(from {source})") and info.value.source == source


def test_a_refused_value_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        settings(env={"TRITON_VLM_LLAVA_STREAM_QUANTIZATION": "int4"}, name="llava_stream")
    assert str(info.value) == ("model 'llava_stream': quantization must be one of ('none', 'fp8'), got 'int4' "
                               "(from TRITON_VLM_LLAVA_STREAM_QUANTIZATION)")


@pytest.mark.parametrize("key", ["preload", "trust_remote_code", "tiny", "cuda_graphs"])
def test_a_bad_bool_names_the_key_and_value(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'llava': {key}: expected true/false, got 'sometimes' "
                                          rf"\(from parameter '{key}'\)"):
        settings({**BASE, key: "sometimes"})


def test_a_near_miss_variable_is_an_error_and_other_models_variables_are_not() -> None:
    with pytest.raises(ConfigError) as info:
        settings(env={"TRITON_VLM_LLAVA_MAX_MODEL_LENGTH": "512"})
    assert str(info.value) == ("model 'llava': TRITON_VLM_LLAVA_MAX_MODEL_LENGTH sets no setting; did you mean "
                               "TRITON_VLM_LLAVA_MAX_MODEL_LEN?")
    assert info.value.source == "TRITON_VLM_LLAVA_MAX_MODEL_LENGTH"
    # Variables of models whose names extend llava's, the launcher's, and unrelated ones are left alone.
    assert settings(env={"TRITON_VLM_LLAVA_NEXT_DTYPE": "x", "TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS": "x",
                         "TRITON_VLM_LLAVA_QUEUE_TIMEOUT_MS": "5", "TRITON_VLM_LLAVA_FAMILY": "x"}) == settings()


# -- the reader: environment overrides ---------------------------------------------------------------------------------
def test_env_overrides_parameters() -> None:
    env = {"TRITON_VLM_LLAVA_HF_MODEL_ID": "me/my-llava", "TRITON_VLM_LLAVA_MAX_TOKENS_LIMIT": "2048",
           "TRITON_VLM_LLAVA_PRELOAD": "on", "TRITON_VLM_LLAVA_LOCAL_PATH": "/models/llava",
           "TRITON_VLM_LLAVA_MAX_IMAGE_PIXELS": "1000", "TRITON_VLM_LLAVA_MAX_NUM_SEQS": "4",
           "TRITON_VLM_KOSMOS2_HF_MODEL_ID": "not/for-llava"}  # another model's variable does nothing
    s = settings({**BASE, "max_num_seqs": "8"}, env=env)
    assert (s.weights.hf_model_id, s.weights.preload, s.weights.local_path) == ("me/my-llava", True, "/models/llava")
    assert (s.limits.max_tokens_limit, s.limits.max_image_pixels, s.engine.max_num_seqs) == (2048, 1000, 4)


def test_env_override_of_model_family_uses_the_model_family_name() -> None:
    assert settings(env={"TRITON_VLM_LLAVA_MODEL_FAMILY": "kosmos2"}).family == "kosmos2"


def test_env_prefix_follows_model_name_with_odd_characters() -> None:
    s = settings({"model_family": "llava"}, env={"TRITON_VLM_MY_MODEL_V2_DTYPE": "float16"}, name="my-model.v2")
    assert s.weights.dtype == "float16"


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_LLAVA_DEFAULT_MAX_TOKENS", "7")
    assert read_settings("llava", BASE).limits.default_max_tokens == 7
    # An explicit env mapping replaces os.environ entirely.
    assert read_settings("llava", BASE, env={}).limits.default_max_tokens == 128


def test_an_engine_model_reads_its_base_models_variables_then_its_own() -> None:
    """llava_stream (base_model llava): TRITON_VLM_LLAVA_* apply to it, TRITON_VLM_LLAVA_STREAM_* win."""
    parameters = {**BASE, "base_model": "llava"}
    env = {"TRITON_VLM_LLAVA_DTYPE": "float16", "TRITON_VLM_LLAVA_MAX_QUEUE_SIZE": "10",
           "TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS": "16", "TRITON_VLM_LLAVA_STREAM_STREAM_INTERVAL": "8",
           "TRITON_VLM_LLAVA_STREAM_MAX_PREFILL_TOKENS": "1024", "TRITON_VLM_LLAVA_STREAM_KV_CACHE_DTYPE": "fp8",
           "TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN": "768"}
    s = read_settings("llava_stream", parameters, env=env)
    assert (s.model_name, s.family, s.base_model, s.weights.dtype) == ("llava_stream", "llava", "llava", "float16")
    assert s.engine == EngineConfig(max_model_len=768, max_num_seqs=16, max_queue_size=10, max_prefill_tokens=1024,
                                    kv_cache_dtype="fp8", stream_interval=8)
    env["TRITON_VLM_LLAVA_STREAM_MAX_QUEUE_SIZE"] = "0"
    assert read_settings("llava_stream", parameters, env=env).engine.max_queue_size == 0
    # The public model reads only its own.
    assert read_settings("llava", BASE, env=env).engine.max_num_seqs == 64


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False),
                                             ("no", False)])
def test_global_tiny_switch(value: str, expected: bool) -> None:
    assert settings(env={"TRITON_VLM_TINY": value}).weights.tiny is expected
    assert tiny_mode({"TRITON_VLM_TINY": value}) is expected


def test_model_tiny_setting_beats_global_switch() -> None:
    assert settings(env={"TRITON_VLM_TINY": "1", "TRITON_VLM_LLAVA_TINY": "0"}).weights.tiny is False
    assert settings({**BASE, "tiny": "false"}, env={"TRITON_VLM_TINY": "1"}).weights.tiny is False
    assert settings({**BASE, "tiny": "true"}, env={}).weights.tiny is True


def test_tiny_mode_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_VLM_TINY", "yes")
    assert tiny_mode() is True
    monkeypatch.delenv("TRITON_VLM_TINY")
    assert tiny_mode() is False


def test_bad_global_tiny_value_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"TRITON_VLM_TINY: expected true/false, got 'maybe'"):
        settings(env={"TRITON_VLM_TINY": "maybe"})


def test_launcher_batching_comes_from_the_models_own_variables() -> None:
    assert read_batching("m", env={}) == BatchingConfig()
    env = {"TRITON_VLM_M_MAX_QUEUE_SIZE": "9", "TRITON_VLM_M_QUEUE_TIMEOUT_MS": "0", "TRITON_VLM_M_BATCH_DELAY_US": "",
           "TRITON_VLM_M_STREAM_BATCH_DELAY_US": "5"}
    assert read_batching("m", env=env) == BatchingConfig(max_queue_size=9, queue_timeout_ms=0, batch_delay_us=None)
    with pytest.raises(ConfigError) as info:
        read_batching("m", env={"TRITON_VLM_M_MAX_QUEUE_SIZE": "lots"})
    assert str(info.value) == "model 'm': max_queue_size must be a number, got 'lots' (from TRITON_VLM_M_MAX_QUEUE_SIZE)"
    with pytest.raises(ConfigError, match=r"batch_delay_us must be >= 0, got -1 \(from TRITON_VLM_M_BATCH_DELAY_US\)"):
        read_batching("m", env={"TRITON_VLM_M_BATCH_DELAY_US": "-1"})


# -- Triton's forms of the parameters --------------------------------------------------------------------------------
def test_string_parameters_of_json_and_protobuf_configs() -> None:
    config = {"parameters": {"model_family": {"string_value": "kosmos2"}, "preload": {"string_value": "true"},
                             "odd": {}}}
    assert string_parameters(config["parameters"]) == {"model_family": "kosmos2", "preload": "true", "odd": ""}
    assert string_parameters({}) == {} and string_parameters(None) == {}
    from triton_vlm._protocol.model_config import load_model_config

    proto = load_model_config(REPOSITORY / "moondream2" / "config.pbtxt")
    assert string_parameters(proto.parameters)["revision"] == "2025-06-21"


def test_settings_from_triton_args() -> None:
    args = {"model_name": "llava_stream", "model_config": json.dumps({"parameters": {
        "base_model": {"string_value": "llava"}, "max_num_seqs": {"string_value": "8"}}})}
    s = settings_from_triton_args(args, "llava")  # the family from the model.py where the config names none
    assert (s.family, s.base_model, s.engine.max_num_seqs) == ("llava", "llava", 8)
    with pytest.raises(ConfigError, match="model_family' is required"):
        settings_from_triton_args(args, None)


# -- parse_bool / env_prefix -------------------------------------------------------------------------------------
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
    """Any string either becomes the integer it spells or a ConfigError; nothing else escapes."""
    try:
        expected: int | None = int(value)
    except ValueError:
        expected = None
    params = {"model_family": "llava", "max_image_pixels": value}
    if expected is not None and expected > 0:
        assert settings(params).limits.max_image_pixels == expected
    else:
        with pytest.raises(ConfigError):
            settings(params)


@pytest.mark.parametrize("name, prefix", [
    ("llava", "TRITON_VLM_LLAVA_"), ("kosmos2", "TRITON_VLM_KOSMOS2_"), ("my-model.v2", "TRITON_VLM_MY_MODEL_V2_"),
    ("Moon Dream", "TRITON_VLM_MOON_DREAM_"),
])
def test_env_prefix(name: str, prefix: str) -> None:
    assert env_prefix(name) == prefix


# -- the repository's configs, read through the schema -------------------------------------------------------------
PUBLIC = ["kosmos2", "llava", "llava_next", "llava_onevision", "moondream2", "qwen2_vl", "smolvlm"]
#: Those that were served before the schema (tests/data/legacy_stream_configs/public_parameters.json).
LEGACY_PUBLIC = ["kosmos2", "llava", "moondream2", "smolvlm"]
#: Public models whose family is not their name (made by `triton-vlm add-model`); none ship today.
FAMILY_OF: dict[str, str] = {}


@pytest.mark.parametrize("name", PUBLIC)
def test_the_shipped_configs_set_only_what_differs_from_the_schema(name: str) -> None:
    read_name, parameters = read_config_file(REPOSITORY / name / "config.pbtxt")
    family = FAMILY_OF.get(name, name)
    assert read_name == name
    expected = {"model_family": family, "hf_model_id": get_family(family).default_hf_model_id}
    if name == "moondream2":
        expected["revision"] = "2025-06-21"  # moondream2 pins its release
    assert parameters == expected
    s = read_settings(read_name, parameters, env={})
    assert s == ModelSettings(model_name=name, family=family,
                              weights=WeightsConfig(hf_model_id=expected["hf_model_id"],
                                                    revision=expected.get("revision", "main")))


@pytest.mark.parametrize("name", LEGACY_PUBLIC)
def test_the_shipped_configs_resolve_to_what_they_said_before(name: str) -> None:
    """Before the schema, every config.pbtxt listed every default: it resolves to the same settings now."""
    legacy = json.loads((REPOSITORY.parent / "tests" / "data" / "legacy_stream_configs" /
                         "public_parameters.json").read_text())[name]
    if name == "smolvlm":  # then served by the auto family; its own family since
        legacy["model_family"] = "smolvlm"
    assert read_settings(name, legacy, env={}) == read_settings(*read_config_file(REPOSITORY / name / "config.pbtxt"),
                                                                 env={})


def test_read_config_file_falls_back_to_directory_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "unnamed"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(
        'backend: "python"\nparameters { key: "model_family" value: { string_value: "llava" } }\n')
    assert read_config_file(model_dir / "config.pbtxt") == ("unnamed", {"model_family": "llava"})
