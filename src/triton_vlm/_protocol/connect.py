"""tritonclient's client objects, made in one place."""

from __future__ import annotations

from typing import Any

from triton_vlm._protocol.tensors import Api, client_module


def make_client(api: Api, url: str, *, timeout: float | None = None) -> Any:
    """A ``tritonclient.<api>.InferenceServerClient`` for ``url`` (``host:port``). ``timeout`` bounds an HTTP
    client's connection and each of its calls; gRPC calls take theirs per call (``client_timeout``)."""
    module = client_module(api)
    if api == "http" and timeout is not None:
        return module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    if api == "http.aio" and timeout is not None:
        return module.InferenceServerClient(url, conn_timeout=timeout)
    return module.InferenceServerClient(url)
