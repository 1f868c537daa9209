"""Short import path for the client: ``from triton_client import TritonVLMClient``."""

from triton_vlm.client import InferenceResult, TritonVLMClient, encode_image
from triton_vlm.errors import (InvalidInputError, ModelUnavailableError, ServerUnreachableError, TritonVLMError,
                               UnknownModelError)

__all__ = [
    "InferenceResult",
    "InvalidInputError",
    "ModelUnavailableError",
    "ServerUnreachableError",
    "TritonVLMClient",
    "TritonVLMError",
    "UnknownModelError",
    "encode_image",
]
