"""Turn (image, task, prompt) requests into moondream2 model inputs: template token ids and a padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from triton_vlm.chat import Chat
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.moondream2.config import MoondreamConfig, TokenizerConfig
from triton_vlm.models.moondream2.image import normalize_crops, overlap_crops
from triton_vlm.models.moondream2.tasks import Task
from triton_vlm.models.moondream2.tokenizer import Moondream2Tokenizer, TokenizerGeneration


@dataclass
class Moondream2Processor:
    """Tokenizer + templates + image preprocessing of one loaded checkpoint."""

    tokenizer: Moondream2Tokenizer
    config: MoondreamConfig
    generation: TokenizerGeneration

    @property
    def tokens(self) -> TokenizerConfig:
        return self.config.tokenizer

    def prompt_tokens(self, task: Task, prompt: str) -> list[int]:
        """Token ids that follow BOS and the image: the reference's template for ``task`` around ``prompt``."""
        template = self.tokens.templates.get(task.kind)
        if template is None:
            raise InvalidInputError(f"task: this moondream2 checkpoint has no {task.kind!r} template", param="task")
        if task.kind == "caption":
            if task.length not in template:
                raise InvalidInputError(f"task: this moondream2 checkpoint has no {task.length!r} caption",
                                        param="task")
            return list(template[task.length])
        # The reference puts a space before object names; before questions only in the legacy generation.
        text = (self.generation.question_prefix if task.kind == "query" else " ") + prompt
        tokens = [*template["prefix"], *self.tokenizer.encode(text), *template["suffix"]]
        if task.kind == "query" and self.generation.query_suffix_twice:
            tokens += template["suffix"]
        return tokens

    def chat_tokens(self, chat: Chat) -> list[int]:
        """Token ids that follow BOS and the image for a conversation, in the reference's chat-history format
        (moondream2's 2024 code: ``Question: q1 Answer: a1 Question: q2 Answer:``): each user turn in the query
        template, each earlier answer after its own. System text goes in front of the first question, followed by
        a blank line. A single user turn is exactly :meth:`prompt_tokens` of its text."""
        query = Task("query")
        system = "\n".join(m.text for m in chat.messages if m.role == "system")
        tokens: list[int] = []
        for message in chat.messages:
            if message.role == "user":
                text = f"{system}\n\n{message.text}" if system else message.text
                system = ""
                tokens += self.prompt_tokens(query, text)
            elif message.role == "assistant":
                tokens += self.tokenizer.encode(self.generation.question_prefix + message.text)
        return tokens

    def __call__(self, images: list[Image.Image], prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded batch: ``[pad..., BOS, image slots..., prompt...]`` per row, with its crops.

        ``image_mask`` marks the slots the model fills with image features; ``pixel_values`` holds every
        row's crops back to back (``crop_counts`` per row, ``tilings`` their local grids).
        """
        prefix = 1 + self.config.vision.num_patches
        limit = self.config.text.max_context
        for tokens in prompts:
            if prefix + len(tokens) >= limit:
                raise InvalidInputError(f"prompt: {len(tokens)} tokens after the {prefix} image tokens exceed the "
                                        f"context of {limit} tokens", param="prompt")
        length = prefix + max(len(t) for t in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        image_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        crops, counts, tilings = [], [], []
        for row, (image, tokens) in enumerate(zip(images, prompts, strict=True)):
            start = length - prefix - len(tokens)
            input_ids[row, start] = self.tokens.bos_id
            input_ids[row, start + prefix:] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, start:] = 1
            image_mask[row, start + 1: start + prefix] = True
            crop_set = overlap_crops(image, self.config.vision)
            crops.append(normalize_crops(crop_set.crops))
            counts.append(len(crop_set.crops))
            tilings.append(crop_set.tiling)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_mask": image_mask,
            "pixel_values": torch.cat(crops),
            "crop_counts": torch.tensor(counts, dtype=torch.long),
            "tilings": torch.tensor(tilings, dtype=torch.long),
        }
