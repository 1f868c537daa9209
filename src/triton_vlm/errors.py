"""One error hierarchy for the whole project, and its mapping to Triton error codes.

    TritonVLMError
    ├── InvalidInputError       bad image, prompt or sampling value   -> INVALID_ARG
    ├── ModelUnavailableError   weights missing, load failed          -> UNAVAILABLE
    │   └── ModelLoadError
    ├── UnknownModelError       no such model / family                -> NOT_FOUND
    ├── GenerationError         the model failed while generating     -> INTERNAL
    ├── RequestCancelledError   the client cancelled                  -> CANCELLED
    ├── ServerUnreachableError  nothing listens there (client side)   -> UNAVAILABLE
    │   └── ConnectionLostError the server dropped the connection mid-request
    └── RequestTimeoutError     no answer within the client's timeout

The backend turns each into a per-request ``TritonError`` so one bad request never fails a batch.
The client raises the same classes from server answers, so callers catch one tree everywhere.
"""

from __future__ import annotations


class TritonVLMError(Exception):
    """Base of every error this project raises on purpose."""

    #: Name of the matching ``pb_utils.TritonError`` code attribute.
    triton_code: str = "INTERNAL"


class InvalidInputError(TritonVLMError, ValueError):
    """The request itself is wrong (image, prompt, dtype, sampling values); retrying will not help."""

    triton_code = "INVALID_ARG"


class ModelUnavailableError(TritonVLMError):
    """The model cannot serve right now (not loaded, failed to load); a later retry may work."""

    triton_code = "UNAVAILABLE"


class ModelLoadError(ModelUnavailableError):
    """Loading weights or processor failed; the message says what to do about it."""


class UnknownModelError(TritonVLMError, KeyError):
    """No model or model family of that name."""

    triton_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class GenerationError(TritonVLMError):
    """The forward pass failed for a reason that is not the request's fault."""

    triton_code = "INTERNAL"


class RequestCancelledError(TritonVLMError):
    """The client cancelled the request (or went away) before its answer was ready; its work was stopped."""

    triton_code = "CANCELLED"


class ServerUnreachableError(TritonVLMError):
    """The client could not reach the server (not started, wrong URL, still starting)."""

    triton_code = "UNAVAILABLE"


class ConnectionLostError(ServerUnreachableError):
    """The server closed the connection before answering: it crashed or restarted mid-request. The request may
    have run; an inference has no side effects, so :class:`RetryPolicy` retries it like a refused connection."""


class RequestTimeoutError(TritonVLMError, TimeoutError):
    """The client gave up waiting for an answer (its ``timeout``); the server may still be working on it, so
    retrying is left to the caller."""

    triton_code = "UNAVAILABLE"
