"""From OpenAI chat messages to what triton-vlm's models take: one prompt and one image.

The rules (docs/openai.md):

- The last message must be the user's; its text parts, joined by newlines, are the question.
- Exactly one ``image_url`` part in the whole conversation (usually in the last user message; an image sent
  earlier in a multi-turn chat counts too). None, or more than one, is a 400.
- ``system``/``developer`` text goes in front of the prompt, followed by a blank line.
- Earlier user and assistant turns are folded into the prompt as a transcript
  (``User: ...\\nAssistant: ...\\n``), then ``User: <question>``. A single user message is sent as it is, so
  the answer equals the KServe API's for the same prompt.
- ``tool`` messages and assistant ``tool_calls`` are refused: these models call no tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from triton_vlm.openai.errors import APIError
from triton_vlm.openai.schemas import (
    AssistantMessage,
    ImagePart,
    Message,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
)


@dataclass(frozen=True)
class Conversation:
    prompt: str
    image_url: str
    #: Where the image is in the request, e.g. ``messages[0].content[1].image_url.url``, for error answers.
    image_param: str


def _texts(content: str | Sequence[object] | None) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
    return texts


def conversation(messages: Sequence[Message]) -> Conversation:
    """The prompt and the single image of ``messages``; :class:`APIError` (400) saying what is wrong."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if isinstance(message, ToolMessage):
            raise APIError(400, "tool messages are not supported: these models call no tools",
                           param=f"messages[{i}].role", code="unsupported_value")
        if isinstance(message, AssistantMessage) and message.tool_calls:
            raise APIError(400, "assistant tool_calls are not supported: these models call no tools",
                           param=f"messages[{i}].tool_calls", code="unsupported_value")
        if isinstance(message, UserMessage) and not isinstance(message.content, str):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
    last = messages[-1]
    if not isinstance(last, UserMessage):
        raise APIError(400, f"the last message must be the user's (got role '{last.role}'): it holds the question "
                            f"about the image", param=f"messages[{len(messages) - 1}].role")
    if not images:
        raise APIError(400, "this model needs exactly one image per request: add an image_url content part "
                            "(a data: URI such as data:image/png;base64,...) to the user message",
                       param="messages", code="image_required")
    if len(images) > 1:
        raise APIError(400, f"this model takes exactly one image per request, got {len(images)}; send the others "
                            f"in separate requests", param=images[1][1], code="too_many_images")

    question = "\n".join(_texts(last.content))
    instructions = [text for m in messages[:-1] if isinstance(m, SystemMessage) for text in _texts(m.content)]
    turns = [(m.role, "\n".join(_texts(m.content))) for m in messages[:-1]
             if isinstance(m, (UserMessage, AssistantMessage))]
    prompt = question
    if turns:
        transcript = "".join(f"{'User' if role == 'user' else 'Assistant'}: {text}\n" for role, text in turns)
        prompt = f"{transcript}User: {question}"
    if instructions:
        prompt = "\n".join(instructions) + "\n\n" + prompt
    url, param = images[0]
    return Conversation(prompt=prompt, image_url=url, image_param=param)
