"""Python client for triton-vlm servers (HTTP or gRPC), built on ``tritonclient``."""

from triton_vlm.client.client import InferenceResult, TritonVLMClient, encode_image

__all__ = ["InferenceResult", "TritonVLMClient", "encode_image"]
