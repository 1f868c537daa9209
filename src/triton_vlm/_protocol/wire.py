"""An error's Triton code, request field and message, carried in the one string Triton passes on.

Triton carries an error's message everywhere, its status code only on plain infer calls (a decoupled model's
error reaches a gRPC stream client as a bare message; a BLS caller sees every error as INTERNAL) and never the
request field at fault. So the backend sends every error message encoded::

    [INVALID_ARG param=image] image: empty; send the bytes of a PNG or JPEG file
    [UNAVAILABLE] overloaded: 64 requests are running or waiting in its engine (limit 64)

and :mod:`triton_vlm._protocol.errors` decodes it into the error tree (a raw tritonclient user reads it as is).
Dependency-free: the backend imports it inside Triton's stub, the torch-free forwarder included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Triton's error code names (``pb_utils.TritonError``'s attributes) the encoding carries.
CODES = ("INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "INTERNAL", "CANCELLED", "UNSUPPORTED", "ALREADY_EXISTS")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENCODED = re.compile(rf"^\[({'|'.join(CODES)})(?: param=({_PARAM.pattern}))?\] (.*)\Z", re.S)


@dataclass(frozen=True)
class WireError:
    """What one encoded error message carries."""

    code: str
    message: str
    param: str | None = None


def encode_error(code: str, message: str, param: str | None = None) -> str:
    """The message to send for an error. Lenient, as it runs while answering a request: an unknown code is sent
    as ``INTERNAL`` and a ``param`` that is not a plain name is left out."""
    code = code if code in CODES else "INTERNAL"
    field = f" param={param}" if param and _PARAM.fullmatch(param) else ""
    return f"[{code}{field}] {message}"


def decode_error(text: str) -> WireError | None:
    """What :func:`encode_error` wrote, or None for a message that is not encoded (Triton's own errors)."""
    match = _ENCODED.match(text)
    if match is None:
        return None
    return WireError(code=match[1], message=match[3], param=match[2])
