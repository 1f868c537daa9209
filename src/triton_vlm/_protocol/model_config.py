"""Read, change and write Triton ``config.pbtxt`` files through Triton's own protobuf schema."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as model_config_pb2  # re-exported: config/contract.py uses it

ModelConfig = model_config_pb2.ModelConfig


def load_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a ``config.pbtxt``; a typo fails here with the protobuf parser's line and column."""
    config = model_config_pb2.ModelConfig()
    text_format.Parse(Path(path).read_text(), config)
    return config


def dump_model_config(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def force_instance_kind(config: model_config_pb2.ModelConfig, kind: str) -> None:
    """Set every instance group to ``KIND_CPU`` or ``KIND_GPU`` (for hosts without GPUs)."""
    value = model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    for group in config.instance_group:
        group.kind = value
        if value == model_config_pb2.ModelInstanceGroup.KIND_CPU:
            del group.gpus[:]
