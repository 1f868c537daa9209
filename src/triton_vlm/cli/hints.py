"""What ``triton-vlm infer`` says when a request fails for a reason the client's own error hides.

- ``--grpc`` at Triton's HTTP port (or HTTP at its gRPC port): the client only sees a connection that closed,
  which reads like a server restart. The other protocol is tried once on the same address; where it answers,
  the message names the port and flag to use.
- A ``<model>_stream`` model over plain infer: Triton refuses decoupled models there ("HTTP end point doesn't
  support models with decoupled transaction policy"). The model's configuration says whether it is decoupled;
  the message names the model to ask instead.
"""

from __future__ import annotations

from typing import Literal

from triton_vlm.errors import ServerUnreachableError, TritonVLMError


def other_protocol_answers(url: str, protocol: str, timeout: float = 3.0) -> bool:
    """Whether a Triton server answers at ``url`` over the protocol that is not ``protocol``."""
    from triton_vlm.client import TritonVLMClient

    other: Literal["http", "grpc"] = "http" if protocol == "grpc" else "grpc"
    try:
        with TritonVLMClient(url, protocol=other, timeout=timeout) as client:
            client.server_metadata()  # raises where nothing (or no Triton) answers that way
            return True
    except Exception:  # nothing answers that way either: the original error stands
        return False


def explain_unreachable(error: ServerUnreachableError, url: str, protocol: str) -> TritonVLMError:
    """``error`` with the port and flag to use, where ``url`` is the server's port of the other protocol."""
    if not other_protocol_answers(url, protocol):
        return error
    if protocol == "grpc":
        hint = (f"{url} is Triton's HTTP port, not its gRPC port: with --grpc, --url must name the gRPC port "
                f"(8001 by default; `triton-vlm serve --grpc-port`), or leave out --grpc to use HTTP here")
    else:
        hint = (f"{url} is Triton's gRPC port, not its HTTP port: add --grpc to use gRPC there, or point --url at "
                f"the HTTP port (8000 by default; `triton-vlm serve --http-port`)")
    return ServerUnreachableError(f"{hint}. ({protocol} said: {error})")
