"""Short import path for the client: ``from triton_client import TritonVLMClient``."""

from triton_vlm.client import InferenceResult, RetryPolicy, StreamPiece, TritonVLMClient, encode_image
from triton_vlm.client.aio import AsyncTritonVLMClient
from triton_vlm.errors import (InvalidInputError, ModelUnavailableError, RequestTimeoutError, ServerUnreachableError,
                               TritonVLMError, UnknownModelError)

__all__ = [
    "AsyncTritonVLMClient",
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
    "encode_image",
]
