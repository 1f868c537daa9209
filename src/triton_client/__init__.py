"""Short import path for the client: ``from triton_client import TritonVLMClient``."""

from triton_vlm.client import (
    Box,
    Entity,
    InferenceResult,
    RetryPolicy,
    StreamPiece,
    TritonVLMClient,
    draw_entities,
    encode_image,
    entities_from_answer,
)
from triton_vlm.client.aio import AsyncTritonVLMClient
from triton_vlm.errors import (
    ConnectionLostError,
    InvalidInputError,
    ModelUnavailableError,
    RequestTimeoutError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)

__all__ = [
    "AsyncTritonVLMClient",
    "Box",
    "ConnectionLostError",
    "Entity",
    "InferenceResult",
    "InvalidInputError",
    "ModelUnavailableError",
    "RequestTimeoutError",
    "RetryPolicy",
    "ServerUnreachableError",
    "StreamPiece",
    "TritonVLMClient",
    "TritonVLMError",
    "UnknownModelError",
    "draw_entities",
    "encode_image",
    "entities_from_answer",
]
