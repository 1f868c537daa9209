"""Python client for triton-vlm servers (HTTP or gRPC), built on ``tritonclient``; sync and asyncio."""

from triton_vlm.client.client import InferenceResult, StreamPiece, TritonVLMClient, encode_image
from triton_vlm.client.retry import RetryPolicy

__all__ = ["AsyncTritonVLMClient", "InferenceResult", "RetryPolicy", "StreamPiece", "TritonVLMClient",
           "encode_image"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "AsyncTritonVLMClient":  # lazy: imports tritonclient's asyncio modules (aiohttp, grpc.aio)
        from triton_vlm.client.aio import AsyncTritonVLMClient

        return AsyncTritonVLMClient
    raise AttributeError(name)
