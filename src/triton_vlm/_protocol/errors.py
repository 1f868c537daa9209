"""Every error on the way to Triton, as the project's error tree (:mod:`triton_vlm.errors`).

Errors the backend sent come encoded (:mod:`.wire`): their code picks the class, and the request field and the
message are taken as they are. Triton's own errors (unknown model, full queue, a dead stub) and the transport's
(refused connection, deadline, hang-up) are recognised here, the one place that reads Triton's message texts.
"""

from __future__ import annotations

import asyncio
from http.client import HTTPException
from typing import Any

from triton_vlm._protocol.wire import decode_error
from triton_vlm.errors import (
    ConnectionLostError,
    GenerationError,
    InvalidInputError,
    ModelUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)

#: The class for each code the backend sends; any other code is a :class:`GenerationError` that keeps it.
CLASS_OF_CODE: dict[str, type[TritonVLMError]] = {
    "INVALID_ARG": InvalidInputError,
    "UNAVAILABLE": ModelUnavailableError,
    "NOT_FOUND": UnknownModelError,
    "CANCELLED": RequestCancelledError,
    "INTERNAL": GenerationError,
}


def translate(exc: BaseException, *, model: str | None, url: str,
              timeout: float | None = None) -> TritonVLMError | None:
    """``exc`` (raised by tritonclient, gRPC, the HTTP stack or the network) as the project's error; None for an
    exception that is none of those (a bug: let it propagate). ``model`` is the model called, ``url`` the
    server's address, ``timeout`` the caller's (for the messages)."""
    if isinstance(exc, TritonVLMError):
        return exc
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return server_error(exc.message() or str(exc), exc.status(), model=model, url=url, timeout=timeout)
    rpc = _rpc_error(exc)
    if rpc is not None:  # the gRPC call itself failed (e.g. nothing listens there)
        return server_error(rpc.details() or "", str(rpc.code()), model=model, url=url, timeout=timeout)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return RequestTimeoutError(f"no answer from {url}{_within(timeout)}", model=model)
    if isinstance(exc, (ConnectionError, OSError)):  # aiohttp's ClientConnectorError too
        return unreachable(url, exc, model)
    if isinstance(exc, HTTPException):  # geventhttpclient's: the server hung up mid-answer
        return connection_lost(url, exc, model)
    if type(exc).__module__.startswith("aiohttp"):
        if type(exc).__name__ == "ServerDisconnectedError":
            return connection_lost(url, exc, model)
        return unreachable(url, exc, model)
    return None


def server_error(message: str, status: Any, *, model: str | None, url: str,
                 timeout: float | None = None) -> TritonVLMError:
    """The error for a server's answer: its message and status (HTTP ``"400"``, gRPC ``"StatusCode.NOT_FOUND"``;
    None on a stream, where Triton sends none)."""
    status = str(status or "")
    if status == "StatusCode.DEADLINE_EXCEEDED" or message.lower() == "deadline exceeded":
        return RequestTimeoutError(f"no answer from {url}{_within(timeout)} ({message})", model=model)
    encoded = decode_error(message)
    if encoded is not None:  # the backend's own: its code, field and message as sent
        kind = CLASS_OF_CODE.get(encoded.code, GenerationError)
        return kind(encoded.message, model=model, param=encoded.param, code=encoded.code)
    return _triton_error(message, status, model, url)


def _triton_error(message: str, status: str, model: str | None, url: str) -> TritonVLMError:
    """Triton's own errors, told apart by status and by the texts Triton 2.51 uses."""
    lowered = message.lower()
    if "has no available versions" in lowered or ("stub process" in lowered and "not healthy" in lowered):
        # The model exists but cannot serve this moment: its Python stub died, or it is being reloaded.
        return ModelUnavailableError(f"model {model!r} is not available right now (restarting?); retry shortly: "
                                     f"{message}", model=model)
    if "exceeds maximum queue size" in lowered or "request timeout expired" in lowered:
        return ModelUnavailableError(f"model {model!r} is overloaded (its queue is full or the request waited past "
                                     f"its timeout); retry with backoff: {message}", model=model)
    if "unknown model" in lowered or ("not found" in lowered and model and model in message):
        return UnknownModelError(f"model {model!r} is not served at {url}: {message}", model=model)
    if status in ("400", "StatusCode.INVALID_ARGUMENT"):
        return InvalidInputError(message, model=model)
    if status in ("503", "StatusCode.UNAVAILABLE"):
        if any(sign in lowered for sign in ("socket closed", "connection reset", "broken pipe")):
            return connection_lost(url, message, model)
        if "failed to connect" in lowered or "connection refused" in lowered or lowered == "unavailable":
            return unreachable(url, message, model)
        return ModelUnavailableError(message, model=model)
    if status in ("", "None") and ("connect" in lowered or "refused" in lowered):
        return unreachable(url, message, model)
    if status in ("404", "StatusCode.NOT_FOUND"):
        return UnknownModelError(message, model=model)
    if status in ("499", "StatusCode.CANCELLED"):
        return RequestCancelledError(message, model=model)
    return GenerationError(message, model=model)


def unreachable(url: str, cause: object, model: str | None = None) -> ServerUnreachableError:
    return ServerUnreachableError(f"cannot reach triton-vlm server at {url}: {cause}", model=model)


def connection_lost(url: str, cause: object, model: str | None = None) -> ConnectionLostError:
    """The error for a server that closed the connection before its answer (it crashed or restarted)."""
    return ConnectionLostError(f"triton-vlm server at {url} closed the connection before answering (did it "
                               f"restart?); retrying is safe: {cause or 'connection closed'}", model=model)


def is_restricted(exc: BaseException) -> bool:
    """True for Triton's answer to an API the launcher keeps behind its admin key (the repository index)."""
    return "is restricted" in str(exc)


def _within(timeout: float | None) -> str:
    return f" within {timeout:g}s" if timeout is not None else ""


def _rpc_error(exc: BaseException) -> Any:
    """``exc`` where it is a failed gRPC call (a ``grpc.RpcError`` with its code and details), else None."""
    try:
        import grpc
    except ImportError:  # an HTTP-only install
        return None
    return exc if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)) else None
