"""From OpenAI chat messages to what triton-vlm's models take: the ``messages`` JSON and the images, in order.

The rules (docs/openai.md):

- The conversation goes to the model as it is (system, earlier user and assistant turns, the question), and the
  model renders it with its own chat template (:mod:`triton_vlm.chat` is the shape it is sent in).
- Each ``image_url`` part becomes a ``{"type": "image"}`` part where it stood, and its image the next element of
  the request's ``images``. No image is a text-only chat; how many images a model takes is the model's to say
  (a 400 naming its limit, from the model's error).
- The last message must be the user's: the model answers it.
- ``system`` and ``developer`` messages are system turns; an assistant's ``refusal`` parts count as its text.
- ``tool`` messages and assistant ``tool_calls`` are refused: these models call no tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from triton_vlm.openai.errors import APIError
from triton_vlm.openai.schemas import (
    AssistantMessage,
    ImagePart,
    Message,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolMessage,
)


@dataclass(frozen=True)
class ImageRef:
    url: str
    #: Where the image is in the request, e.g. ``messages[0].content[1].image_url.url``, for error answers.
    param: str


@dataclass(frozen=True)
class Conversation:
    #: The ``messages`` input (JSON): OpenAI's shape with ``{"type": "image"}`` parts in place of the images.
    messages: str
    #: The images, in the order of their parts.
    images: tuple[ImageRef, ...]


def _content(content: str | Sequence[object] | None, where: str, images: list[ImageRef]) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, RefusalPart):
            parts.append({"type": "text", "text": part.refusal})
        elif isinstance(part, ImagePart):
            parts.append({"type": "image"})
            images.append(ImageRef(part.image_url.url, f"{where}.content[{j}].image_url.url"))
    return parts


def conversation(messages: Sequence[Message]) -> Conversation:
    """The ``messages`` JSON and the images of ``messages``; :class:`APIError` (400) saying what is wrong."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    turns: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        if isinstance(message, ToolMessage):
            raise APIError(400, "tool messages are not supported: these models call no tools",
                           param=f"messages[{i}].role", code="unsupported_value")
        if isinstance(message, AssistantMessage) and message.tool_calls:
            raise APIError(400, "assistant tool_calls are not supported: these models call no tools",
                           param=f"messages[{i}].tool_calls", code="unsupported_value")
        role = "system" if isinstance(message, SystemMessage) else message.role
        turns.append({"role": role, "content": _content(message.content, f"messages[{i}]", images)})
    last = messages[-1]
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's (got role '{last.role}'): the model answers it",
                       param=f"messages[{len(messages) - 1}].role")
    return Conversation(messages=json.dumps(turns, ensure_ascii=False), images=tuple(images))
