"""One config schema for every served model: the defaults (schema.py), the one reader of config.pbtxt parameters
and ``TRITON_VLM_<MODEL>_<KEY>`` overrides (reader.py), and the I/O contract every model's config.pbtxt shares
(contract.py, imported on its own: it needs protobuf).

Light on purpose (no torch, no protobuf): the engine, the forwarder and the launcher import it.
"""

from triton_vlm.config.reader import (
    env_prefix,
    parse_bool,
    read_batching,
    read_config_file,
    read_settings,
    settings_from_triton_args,
    string_parameters,
    tiny_mode,
)
from triton_vlm.config.schema import (
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    BatchingConfig,
    ConfigError,
    EngineConfig,
    ModelSettings,
    RequestLimits,
    WeightsConfig,
)

__all__ = ["DTYPES", "KV_CACHE_DTYPES", "QUANTIZATIONS", "BatchingConfig", "ConfigError", "EngineConfig",
           "ModelSettings", "RequestLimits", "WeightsConfig", "env_prefix", "parse_bool", "read_batching",
           "read_config_file", "read_settings", "settings_from_triton_args", "string_parameters", "tiny_mode"]
