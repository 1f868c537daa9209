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

Every error carries structure beside its message: ``model`` (the model it is about, where known), ``code`` (the
Triton code name, ``"INVALID_ARG"``...; by default the class's) and ``param`` (the request field at fault:
``"image"``, ``"prompt"``, ``"max_tokens"``...; None where no one field is). The backend sends all three to
clients (:mod:`triton_vlm._protocol.wire`), so nothing downstream reads them back from the message.
Dependency-free: Triton's stub imports it in every model, the torch-free forwarder included.
"""

from __future__ import annotations

from typing import ClassVar


class TritonVLMError(Exception):
    """Base of every error this project raises on purpose."""

    #: Name of the matching ``pb_utils.TritonError`` code attribute: the default of :attr:`code`.
    triton_code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "", *, model: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        #: The model the error is about (the one a client asked), where known.
        self.model = model
        #: The request field at fault (``"image"``, ``"prompt"``, ``"max_tokens"``...), where one is.
        self.param = param
        #: The Triton code name (``"INVALID_ARG"``, ``"UNAVAILABLE"``...).
        self.code = code or self.triton_code


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
