"""What the backend and its readers (clients, the OpenAI front) write into the strings Triton passes on, each
format encoded and decoded here alone, so the two sides cannot drift apart.

**Errors.** An error's Triton code, request field and message, carried in the one string Triton passes on.

Triton carries an error's message everywhere, its status code only on plain infer calls (a decoupled model's
error reaches a gRPC stream client as a bare message; a BLS caller sees every error as INTERNAL) and never the
request field at fault. So the backend sends every error message encoded::

    [INVALID_ARG param=image] image: empty; send the bytes of a PNG or JPEG file
    [UNAVAILABLE] overloaded: 64 requests are running or waiting in its engine (limit 64)

and :mod:`triton_vlm._protocol.errors` decodes it into the error tree (a raw tritonclient user reads it as is).

**Logprobs and choices.** The ``token_logprobs`` output (JSON, per generated token ``{"id", "token", "logprob",
"top": [{"id", "token", "logprob"}...]}``, ``token`` the token's own text; "" when none were asked) and the
``choices`` output of a whole answer for ``n`` > 1 (JSON, choices 1 to n-1 as ``{"index", "text", "finish_reason",
"generated_tokens", "logprobs"}``, ``logprobs`` as ``token_logprobs``, parsed, or null; "" for one choice):
:func:`encode_logprobs` / :func:`decode_logprobs`, :func:`encode_choices` / :func:`decode_choices`.

Dependency-free: the backend imports it inside Triton's stub, the torch-free forwarder included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class TopLogprob:
    """An alternative to a generated token: its id, its own text and its logprob."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (the ``token_logprobs`` output, asked for with ``logprobs``) and its ``top_logprobs``
    most likely alternatives, best first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One of a whole answer's further choices (``n`` > 1; the response itself is choice 0)."""

    index: int
    text: str
    finish_reason: str
    generated_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


def encode_logprobs(entries: Sequence[TokenLogprob]) -> str:
    """The ``token_logprobs`` output for ``entries``; "" for none (the request asked for none)."""
    return json.dumps(_logprobs_json(entries)) if entries else ""


def decode_logprobs(text: str | None) -> tuple[TokenLogprob, ...]:
    """What :func:`encode_logprobs` wrote ("" or None: no entries)."""
    return _logprobs(json.loads(text) if text else None)


def encode_choices(choices: Sequence[Choice]) -> str:
    """The ``choices`` output for choices 1 to n-1; "" for none (one choice)."""
    if not choices:
        return ""
    return json.dumps([{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                        "generated_tokens": c.generated_tokens,
                        "logprobs": _logprobs_json(c.logprobs) if c.logprobs else None} for c in choices])


def decode_choices(text: str | None) -> tuple[Choice, ...]:
    """What :func:`encode_choices` wrote ("" or None: no further choices)."""
    return tuple(Choice(c["index"], c["text"], c["finish_reason"], c["generated_tokens"], _logprobs(c["logprobs"]))
                 for c in (json.loads(text) if text else []))


def _logprobs_json(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"id": e.token_id, "token": e.token, "logprob": e.logprob,
             "top": [{"id": t.token_id, "token": t.token, "logprob": t.logprob} for t in e.top]} for e in entries]


def _logprobs(entries: list[dict[str, Any]] | None) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(e["id"], e["token"], e["logprob"],
                              tuple(TopLogprob(t["id"], t["token"], t["logprob"]) for t in e["top"]))
                 for e in entries or [])
