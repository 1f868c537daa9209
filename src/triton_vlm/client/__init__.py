"""Python client for triton-vlm servers (HTTP or gRPC), built on ``tritonclient``; sync and asyncio."""

from triton_vlm.client.aio import AsyncTritonVLMClient
from triton_vlm.client.client import InferenceResult, StreamPiece, TritonVLMClient, encode_image
from triton_vlm.client.entities import Box, Entity, draw_entities, entities_from_answer, parse_entities
from triton_vlm.client.retry import RetryPolicy

__all__ = ["AsyncTritonVLMClient", "Box", "Entity", "InferenceResult", "RetryPolicy", "StreamPiece",
           "TritonVLMClient", "draw_entities", "encode_image", "entities_from_answer", "parse_entities"]
