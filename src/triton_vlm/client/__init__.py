"""Python client for triton-vlm servers (HTTP or gRPC), built on ``tritonclient``."""

from triton_vlm.client.client import InferenceResult, StreamPiece, TritonVLMClient, encode_image
from triton_vlm.client.entities import Box, Entity, draw_entities, entities_from_answer, parse_entities

__all__ = ["Box", "Entity", "InferenceResult", "StreamPiece", "TritonVLMClient", "draw_entities", "encode_image",
           "entities_from_answer", "parse_entities"]
