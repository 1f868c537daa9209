"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

from typing import Any

from triton_vlm.errors import (
    InvalidInputError,
    ModelUnavailableError,
    RequestTimeoutError,
    ServerUnreachableError,
    TritonVLMError,
    UnknownModelError,
)

#: The ``type`` OpenAI uses for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    """An error answer: raise it anywhere in a request; the app turns it into the JSON body and status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})
        if status in (429, 503) and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = "1"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: The OpenAI field for each request field the backend names (``exc.param``); the others keep their names.
OPENAI_PARAMS = {"image": "messages", "prompt": "messages", "images": "messages"}


def from_triton(exc: TritonVLMError, model: str, *, max_tokens_param: str = "max_completion_tokens") -> APIError:
    """The answer for an error Triton (or the way to it) gave; ``max_tokens_param`` is the field the request
    used for the token limit."""
    message = str(exc)
    if isinstance(exc, UnknownModelError):
        return APIError(404, f"The model '{model}' does not exist: {message}", param="model",
                        code="model_not_found")
    if isinstance(exc, InvalidInputError):
        return APIError(400, message, param=openai_param(exc.param, max_tokens_param), code="invalid_value")
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, message, code="timeout")
    if isinstance(exc, ServerUnreachableError):
        return APIError(503, f"Triton is not reachable: {message}", code="triton_unreachable")
    if isinstance(exc, ModelUnavailableError):
        return APIError(503, message, code="model_unavailable")
    return APIError(500, message, code="generation_error")


def openai_param(param: str | None, max_tokens_param: str) -> str | None:
    """The request field of the chat completion that holds the backend's ``param`` (image and prompt: the
    messages, and so are a chat's images, e.g. a model's limit on them; ``max_tokens``: whichever of ``max_tokens`` / ``max_completion_tokens`` the request used)."""
    if param == "max_tokens":
        return max_tokens_param
    return OPENAI_PARAMS.get(param, param) if param else None
