"""Model settings: defaults in ``config.pbtxt`` parameters, overridable by environment variables.

A parameter ``hf_model_id`` of model ``llava`` is overridden by ``TRITON_VLM_LLAVA_HF_MODEL_ID``.
``TRITON_VLM_TINY=1`` serves the project's tiny random-weight checkpoints instead of real weights.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from triton_vlm.errors import InvalidInputError

if TYPE_CHECKING:
    from triton_vlm.engine.config import EngineConfig

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_bool(value: str | bool, *, name: str) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInputError(f"{name}: expected true/false, got {value!r}")


def env_prefix(model_name: str) -> str:
    """``llava`` -> ``TRITON_VLM_LLAVA_``; ``my-model.v2`` -> ``TRITON_VLM_MY_MODEL_V2_``."""
    return "TRITON_VLM_" + re.sub(r"[^A-Za-z0-9]", "_", model_name).upper() + "_"


def tiny_mode(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return parse_bool(env.get("TRITON_VLM_TINY", "0"), name="TRITON_VLM_TINY")


@dataclass(frozen=True)
class ModelSettings:
    """Everything needed to load and run one served model; validated on construction."""

    model_name: str
    family: str
    hf_model_id: str = ""
    revision: str = "main"
    local_path: str = ""
    dtype: str = "auto"
    device: str = "auto"
    preload: bool = False
    trust_remote_code: bool = False
    tiny: bool = False
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_aspect_ratio: float = 100.0
    # Engine (the <model>_stream models): see triton_vlm.engine.EngineConfig.
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_queue_size: int = 256  # requests that may wait in the engine beyond max_num_seqs; 0: no bound
    kv_cache_memory_fraction: float = 0.85
    cuda_graphs: bool = True
    quantization: str = "none"  # "fp8": fp8 projections (Llama-family language models)
    kv_cache_dtype: str = "auto"  # "fp8": an fp8 KV cache
    max_prefill_tokens: int = 4096  # prompt tokens per engine step: lower for shorter first tokens under load
    stream_interval: int = 1  # streamed deltas: the first at once, then one per this many new tokens, and the last

    def __post_init__(self) -> None:
        if not self.family:
            raise InvalidInputError(f"model {self.model_name!r}: parameter 'model_family' is required")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"model {self.model_name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidInputError(f"model {self.model_name!r}: device must be auto, cpu or cuda[:N]")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise InvalidInputError(
                f"model {self.model_name!r}: need 1 <= default_max_tokens <= max_tokens_limit, "
                f"got {self.default_max_tokens} and {self.max_tokens_limit}"
            )
        for name in ("max_image_bytes", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"model {self.model_name!r}: {name} must be positive")
        if self.stream_interval < 1:
            raise InvalidInputError(f"model {self.model_name!r}: stream_interval must be >= 1")
        if self.max_queue_size < 0:
            raise InvalidInputError(f"model {self.model_name!r}: max_queue_size must be >= 0 (0: no bound)")
        if not self.max_image_aspect_ratio >= 1:  # also refuses NaN
            raise InvalidInputError(f"model {self.model_name!r}: max_image_aspect_ratio must be >= 1")

    @classmethod
    def from_parameters(
        cls, model_name: str, parameters: Mapping[str, str], env: Mapping[str, str] | None = None,
        env_aliases: tuple[str, ...] = (),
    ) -> ModelSettings:
        """Build settings from config.pbtxt parameters, then apply ``TRITON_VLM_<MODEL>_<KEY>`` overrides
        (for each alias in ``env_aliases`` first, then for ``model_name``)."""
        env = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        raw: dict[str, str] = {}
        for key, value in parameters.items():
            key = "family" if key == "model_family" else key
            if key in fields:
                raw[key] = value
        for name in (*env_aliases, model_name):
            prefix = env_prefix(name)
            for key in fields:
                env_key = prefix + ("MODEL_FAMILY" if key == "family" else key.upper())
                if env_key in env:
                    raw[key] = env[env_key]
        if "tiny" not in raw and tiny_mode(env):
            raw["tiny"] = "1"
        if "family" not in raw:
            raise InvalidInputError(f"model {model_name!r}: parameter 'model_family' is required")
        values: dict[str, object] = {"model_name": model_name}
        for key, value in raw.items():
            if key == "model_name":
                continue
            kind = fields[key].type
            if kind == "bool":
                values[key] = parse_bool(value, name=key)
            elif kind in ("int", "float"):
                try:
                    values[key] = int(value) if kind == "int" else float(value)
                except ValueError:
                    raise InvalidInputError(f"model {model_name!r}: {key} must be a number, got {value!r}") from None
            else:
                values[key] = value.strip()
        return cls(**values)  # type: ignore[arg-type]

    def with_overrides(self, **changes: object) -> ModelSettings:
        return dataclasses.replace(self, **changes)

    def engine_config(self) -> EngineConfig:
        from triton_vlm.engine.config import EngineConfig

        return EngineConfig(max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                            kv_cache_memory_fraction=self.kv_cache_memory_fraction, cuda_graphs=self.cuda_graphs,
                            quantization=self.quantization, kv_cache_dtype=self.kv_cache_dtype,
                            max_prefill_tokens=self.max_prefill_tokens)


def read_config_parameters(config_path: Path) -> tuple[str, dict[str, str]]:
    """Read ``name`` and the ``string_value`` parameters of a Triton ``config.pbtxt``."""
    from triton_vlm._protocol.model_config import load_model_config

    config = load_model_config(config_path)
    name = config.name or config_path.parent.name
    return name, {key: param.string_value for key, param in config.parameters.items()}


def parameters_from_json_config(model_config: Mapping[str, object]) -> dict[str, str]:
    """The ``string_value`` parameters from the JSON model config Triton hands to ``initialize``."""
    params = model_config.get("parameters") or {}
    assert isinstance(params, Mapping)
    return {key: str(value.get("string_value", "")) for key, value in params.items()}
