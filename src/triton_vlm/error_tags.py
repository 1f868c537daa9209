"""Error codes carried inside messages, for the two paths where Triton 2.51 drops them.

A decoupled model's error reaches a gRPC stream client as a bare message (the stream protocol has no status
field), and a BLS caller sees every error as INTERNAL. So the ``<model>_stream`` models send
``"INVALID_ARG: image: ..."``; the forwarding model and the client read the tag back into a real code.
Dependency-free: the forwarding model imports it without torch.
"""

from __future__ import annotations

import re

CODES = ("INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "INTERNAL", "CANCELLED", "UNSUPPORTED", "ALREADY_EXISTS")
_TAG = re.compile(rf"^({'|'.join(CODES)}): (.*)$", re.S)


def tag_error(code: str, message: str) -> str:
    return f"{code}: {message}"


def split_error_tag(message: str) -> tuple[str, str]:
    """``(code, message)``; untagged messages are ``INTERNAL``."""
    match = _TAG.match(message)
    return (match[1], match[2]) if match else ("INTERNAL", message)
