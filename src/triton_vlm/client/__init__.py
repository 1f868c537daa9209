"""Python client for triton-vlm servers (HTTP or gRPC), built on ``tritonclient``."""

from triton_vlm.client.client import InferenceResult, StreamPiece, TritonVLMClient, encode_image

__all__ = ["InferenceResult", "StreamPiece", "TritonVLMClient", "encode_image"]
