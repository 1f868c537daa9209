"""The one reader of model settings: ``config.pbtxt`` parameters, then ``TRITON_VLM_<MODEL>_<KEY>`` overrides.

A parameter ``dtype`` of model ``llava`` is overridden by ``TRITON_VLM_LLAVA_DTYPE``. An engine model
(``llava_stream``, whose ``base_model`` is ``llava``) reads its base model's variables first and its own after
them, so ``TRITON_VLM_LLAVA_DTYPE`` applies to both and ``TRITON_VLM_LLAVA_STREAM_MAX_NUM_SEQS`` to the engine only.
``TRITON_VLM_TINY=1`` serves the tiny random-weight checkpoints wherever a model does not say otherwise.

Every misconfiguration is a :class:`ConfigError` while the model loads, naming the key and where its value came
from: an unknown parameter, a value of the wrong type, a value the schema refuses, and a variable that is a near
miss of a key (``..._MAX_MODEL_LENGTH``). Other variables under a model's prefix are left alone: they may belong
to another model whose name extends this one (``llava`` and ``llava_next``, ``llava_stream``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from triton_vlm.config.schema import (
    BatchingConfig,
    ConfigError,
    EngineConfig,
    ModelSettings,
    RequestLimits,
    WeightsConfig,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
#: Parameters that are not settings but are read elsewhere: the Python backend's own, and the launcher's forwarder's.
OTHER_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS", "forward_to", "forward_grpc_url"})
#: Keys outside the sections: the parameter ``model_family`` sets ModelSettings.family.
TOP_KEYS = ("model_family", "base_model")


def parse_bool(value: str | bool, *, name: str) -> bool:
    """1/true/yes/on or 0/false/no/off/"" (any case, spaces around); anything else is a ConfigError for ``name``."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true/false, got {value!r}", key=name)


def env_prefix(model_name: str) -> str:
    """``llava`` -> ``TRITON_VLM_LLAVA_``; ``my-model.v2`` -> ``TRITON_VLM_MY_MODEL_V2_``."""
    return "TRITON_VLM_" + re.sub(r"[^A-Za-z0-9]", "_", model_name).upper() + "_"


def tiny_mode(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return parse_bool(env.get("TRITON_VLM_TINY", "0"), name="TRITON_VLM_TINY")


def string_parameters(parameters: Any) -> dict[str, str]:
    """The ``string_value`` of every parameter: from a protobuf ``ModelConfig.parameters`` map, or from the JSON
    model config Triton hands to ``initialize`` (``{"key": {"string_value": "..."}}``; None: no parameters)."""
    if not parameters:
        return {}
    return {key: str(value.get("string_value", "") if isinstance(value, Mapping) else value.string_value)
            for key, value in parameters.items()}


def _keys(*sections: type) -> dict[str, type]:
    """Every key of ``sections`` with its type."""
    keys: dict[str, type] = {}
    for section in sections:
        hints = typing.get_type_hints(section)
        keys.update((item.name, hints[item.name]) for item in dataclasses.fields(section))
    return keys


#: The keys of ModelSettings's sections, and the launcher's (environment only).
KEYS = _keys(*ModelSettings.SECTIONS.values())
BATCHING_KEYS = _keys(BatchingConfig)


def _parse(key: str, value: str, kind: type, where: str) -> object:
    """``value`` as ``kind`` (bool, int, float, str, or ``int | None`` where "" is None)."""
    text = value.strip()
    if kind is bool:
        return parse_bool(text, name=key)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text == "":
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}", key=key, source=where) from None
    return text


def _near_miss(suffix: str) -> str | None:
    """The key a variable's suffix (``MAX_MODEL_LENGTH``) was probably meant to be, if any."""
    candidates = [key.upper() for key in (*KEYS, *BATCHING_KEYS, "model_family")]
    if any(suffix.endswith("_" + candidate) for candidate in candidates):
        return None  # another model's variable: TRITON_VLM_LLAVA_ + NEXT_DTYPE, + STREAM_MAX_NUM_SEQS
    match = difflib.get_close_matches(suffix, candidates, n=1, cutoff=0.8)
    return match[0] if match else None


def _collect(model_name: str, parameters: Mapping[str, str], env: Mapping[str, str],
             env_names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``key -> (raw value, where it came from)``: the parameters, then each name's variables in turn."""
    raw: dict[str, tuple[str, str]] = {}
    for key, value in parameters.items():
        if key in OTHER_PARAMETERS:
            continue
        if key in BATCHING_KEYS and key not in KEYS:
            raise ConfigError(f"model {model_name!r}: parameter {key!r} is not read from config.pbtxt: set Triton's "
                              f"dynamic_batching there, or {env_prefix(model_name)}{key.upper()}",
                              key=key, source=f"parameter {key!r}")
        if key not in KEYS and key not in TOP_KEYS:
            close = difflib.get_close_matches(key, [*KEYS, *TOP_KEYS], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted([*KEYS, *TOP_KEYS]))}"
            raise ConfigError(f"model {model_name!r}: unknown parameter {key!r} in its config.pbtxt; {hint}",
                              key=key, source=f"parameter {key!r}")
        raw[key] = (value, f"parameter {key!r}")
    for name in env_names:
        prefix = env_prefix(name)
        for variable, value in env.items():
            if not variable.startswith(prefix):
                continue
            key = variable[len(prefix):].lower()
            if key in KEYS or key == "model_family":
                raw[key] = (value, variable)
            elif key not in BATCHING_KEYS and (meant := _near_miss(variable[len(prefix):])) is not None:
                raise ConfigError(f"model {model_name!r}: {variable} sets no setting; did you mean {prefix}{meant}?",
                                  key=key, source=variable)
    return raw


def read_settings(model_name: str, parameters: Mapping[str, str],
                  env: Mapping[str, str] | None = None) -> ModelSettings:
    """The settings of ``model_name`` from its config.pbtxt ``parameters`` (string values) and ``env``
    (default: the process environment); raises :class:`ConfigError` naming the key and its source."""
    env = os.environ if env is None else env
    base = parameters.get("base_model", "").strip()
    raw = _collect(model_name, parameters, env, (base, model_name) if base else (model_name,))
    if "tiny" not in raw and tiny_mode(env):
        raw["tiny"] = ("1", "TRITON_VLM_TINY")
    family = raw.pop("model_family", ("", ""))[0].strip()
    raw.pop("base_model", None)
    return ModelSettings(model_name=model_name, family=family, base_model=base,
                         weights=_section(WeightsConfig, model_name, raw),
                         limits=_section(RequestLimits, model_name, raw),
                         engine=_section(EngineConfig, model_name, raw))


S = TypeVar("S")


def _section(section: type[S], model_name: str, raw: Mapping[str, tuple[str, str]]) -> S:
    """``section`` built from the values in ``raw`` that are its keys (``key -> (value, where from)``)."""
    kinds = _keys(section)
    values: dict[str, object] = {}
    for key, (value, where) in raw.items():
        if key in kinds:
            try:
                values[key] = _parse(key, value, kinds[key], where)
            except ConfigError as exc:
                raise _located(exc, model_name, where) from None
    try:
        return section(**values)
    except ConfigError as exc:
        # A check across keys (default_max_tokens <= max_tokens_limit) names each source that was set.
        where = raw[exc.key][1] if exc.key in raw else ", ".join(raw[key][1] for key in values)
        raise _located(exc, model_name, where or None) from None


def _located(exc: ConfigError, model_name: str, where: str | None) -> ConfigError:
    """``exc`` with the model's name in front and the value's source behind."""
    origin = f" (from {where})" if where else ""
    return ConfigError(f"model {model_name!r}: {exc}{origin}", key=exc.key, source=where)


def read_batching(model_name: str, env: Mapping[str, str] | None = None) -> BatchingConfig:
    """The launcher's per-model queue and batching delay: ``TRITON_VLM_<MODEL>_{MAX_QUEUE_SIZE,QUEUE_TIMEOUT_MS,
    BATCH_DELAY_US}``, for the model's own name only (they are written into its rendered config)."""
    env = os.environ if env is None else env
    prefix = env_prefix(model_name)
    return _section(BatchingConfig, model_name,
                    {key: (env[prefix + key.upper()], prefix + key.upper()) for key in BATCHING_KEYS
                     if prefix + key.upper() in env})


def settings_from_triton_args(args: Mapping[str, str], family: str | None = None) -> ModelSettings:
    """The settings of the model instance Triton is initializing, from its ``initialize`` arguments: the
    parameters of its (rendered) config, with ``family`` (the model.py's) where the config names none."""
    config = json.loads(args["model_config"])
    parameters = string_parameters(config.get("parameters"))
    if family:
        parameters.setdefault("model_family", family)
    return read_settings(args["model_name"], parameters)


def read_config_file(path: Path) -> tuple[str, dict[str, str]]:
    """``(name, string parameters)`` of a ``config.pbtxt``; the name falls back to its directory's."""
    from triton_vlm._protocol.model_config import load_model_config

    config = load_model_config(path)
    return config.name or path.parent.name, string_parameters(config.parameters)
