"""A chat request's conversation: the ``messages`` input (OpenAI's chat shape as JSON), checked into a :class:`Chat`.

The wire shape (docs/contract.md): a JSON list of ``{"role", "content"}`` objects. ``role`` is ``system`` (or
``developer``, its newer OpenAI name), ``user`` or ``assistant``; ``content`` is a string or a list of parts,
``{"type": "text", "text": "..."}`` or ``{"type": "image"}``. Image parts stand where the images are in the
conversation and take the request's ``images`` in order: the first image part is ``images[0]``, and so on. Images
belong to user messages; the last message is the user's (the model answers it).

A :class:`Chat` is what the model families render (``ModelFamily.render_chat``); :meth:`Chat.hf_messages` is the
shape transformers' ``apply_chat_template`` takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from triton_vlm.errors import InvalidInputError

Role = Literal["system", "user", "assistant"]
#: Accepted roles, with the one each is read as (OpenAI's ``developer`` is its newer name for ``system``).
ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ImagePart:
    """Where an image stands in a message: the request's ``images[index]``."""

    index: int


#: A message part: its text, or an image.
Part = str | ImagePart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message's text parts, one per line (for formats that have no image places or text parts)."""
        return "\n".join(part for part in self.parts if isinstance(part, str))

    @property
    def image_count(self) -> int:
        return sum(isinstance(part, ImagePart) for part in self.parts)


@dataclass(frozen=True)
class Chat:
    """A checked conversation: at least one message, the last one the user's."""

    messages: tuple[Message, ...]

    @classmethod
    def single(cls, prompt: str, images: int = 1) -> Chat:
        """One user turn: ``images`` images, then ``prompt`` (what the ``prompt`` + ``image`` form asks)."""
        return cls((Message("user", (*(ImagePart(i) for i in range(images)), prompt)),))

    @property
    def image_count(self) -> int:
        return sum(message.image_count for message in self.messages)

    @property
    def question(self) -> str:
        """The last (user) message's text."""
        return self.messages[-1].text

    def texts(self) -> Iterator[str]:
        """Every text part, in order."""
        for message in self.messages:
            yield from (part for part in message.parts if isinstance(part, str))

    def hf_messages(self) -> list[dict[str, Any]]:
        """The conversation as ``apply_chat_template`` takes it: each content a list of ``{"type": "image"}`` and
        ``{"type": "text", "text": ...}`` parts, images where they stood."""
        return [{"role": m.role, "content": [{"type": "text", "text": part} if isinstance(part, str)
                                             else {"type": "image"} for part in m.parts]}
                for m in self.messages]


def _invalid(message: str, param: str = "messages") -> InvalidInputError:
    return InvalidInputError(f"{param}: {message}", param=param)


def parse_messages(value: str, images: int) -> Chat:
    """The :class:`Chat` of a request's ``messages`` JSON sent with ``images`` images; :class:`InvalidInputError`
    (``param`` ``messages``, or ``images`` where the counts differ) saying what is wrong and where."""
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _invalid(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(raw, list) or not raw:
        raise _invalid('expected a non-empty JSON list of messages, e.g. [{"role": "user", "content": "Hi"}]')
    messages: list[Message] = []
    for i, item in enumerate(raw):
        messages.append(_message(item, f"messages[{i}]", sum(m.image_count for m in messages)))
    if messages[-1].role != "user":
        raise _invalid(f"the last message must be the user's (got {messages[-1].role!r}): the model answers it")
    chat = Chat(tuple(messages))
    if chat.image_count != images:
        raise _invalid(f"messages have {chat.image_count} image part(s) ({{\"type\": \"image\"}}) but the request "
                       f"sends {images} image(s); send one element of 'images' per image part, in order", "images")
    return chat


def _message(item: Any, where: str, images_before: int) -> Message:
    if not isinstance(item, dict):
        raise _invalid(f"{where}: expected an object with 'role' and 'content'")
    name = item.get("role")
    role = ROLES.get(name) if isinstance(name, str) else None
    if role is None:
        raise _invalid(f"{where}.role: expected one of {', '.join(ROLES)}, got {name!r}")
    content = item.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return Message(role, (content,))
    if not isinstance(content, list):
        raise _invalid(f"{where}.content: expected a string or a list of parts")
    parts: list[Part] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image":
            if role != "user":
                raise _invalid(f"{at}: images belong to user messages, not {role}'s")
            parts.append(ImagePart(images_before + sum(isinstance(p, ImagePart) for p in parts)))
        else:
            raise _invalid(f'{at}: expected {{"type": "text", "text": "..."}} or {{"type": "image"}}')
    return Message(role, tuple(parts))
