"""Short import path for the client: ``from triton_client import TritonVLMClient``."""

from triton_vlm.client import (Box, Entity, InferenceResult, TritonVLMClient, draw_entities, encode_image,
                               entities_from_answer)
from triton_vlm.errors import (InvalidInputError, ModelUnavailableError, ServerUnreachableError, TritonVLMError,
                               UnknownModelError)

__all__ = [
    "Box",
    "Entity",
    "InferenceResult",
    "InvalidInputError",
    "ModelUnavailableError",
    "ServerUnreachableError",
    "TritonVLMClient",
    "TritonVLMError",
    "UnknownModelError",
    "draw_entities",
    "encode_image",
    "entities_from_answer",
]
