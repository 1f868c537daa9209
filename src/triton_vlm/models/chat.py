"""Prompts through a processor's own chat template: shared by the families whose checkpoints ship one (``auto``,
``smolvlm``)."""

from __future__ import annotations

from typing import Any

from triton_vlm.errors import InvalidInputError


def reserved_tokens(processor: Any) -> list[str]:
    """Tokens a user prompt may not contain: the processor's image/video placeholders and the tokenizer's
    special tokens (chat-template control tokens such as ``<end_of_utterance>``, ``<|im_end|>``)."""
    tokenizer = processor.tokenizer
    tokens = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    tokens.update(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    tokens.update(str(t) for t in added if getattr(t, "special", False))
    return sorted(t for t in tokens if isinstance(t, str) and t)


def render_chat(processor: Any, prompt: str) -> str:
    """One user turn, ``[image, text]``, through the processor's chat template with the generation prompt; a
    prompt holding a reserved token (:func:`reserved_tokens`) is refused."""
    for token in reserved_tokens(processor):
        if token in prompt:
            raise InvalidInputError(f"prompt: may not contain the reserved token {token!r}", param="prompt")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return str(processor.apply_chat_template(conversation, add_generation_prompt=True))
