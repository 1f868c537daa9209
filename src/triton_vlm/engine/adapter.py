"""What the engine needs from a model family: tokenized prompts, prompt embeddings, a decoder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from triton_vlm.engine.request import EngineRequest


class EngineAdapter(ABC):
    """One per model family the engine runs (``ModelFamily.engine_adapter()``)."""

    @abstractmethod
    def prepare(self, family: Any, processor: Any, image: Any, prompt: str) -> tuple[list[int], dict[str, Any]]:
        """Prompt token ids (image placeholders expanded) and the multimodal inputs for one request."""

    @abstractmethod
    def build_decoder(self, model: Any) -> Any:
        """The language model's forward over the slot cache (``LlamaDecoder``, ``MoondreamDecoder``)."""

    @abstractmethod
    def encode_images(self, model: Any, pixels: torch.Tensor, *args: Any) -> Any:
        """The vision tower (and projector) over a batch of images' pixels, on the device."""

    def image_shape(self, model: Any) -> tuple[int, ...] | None:
        """The one shape every image's pixels reach :meth:`encode_images` in (then the engine may replay it as
        CUDA graphs); None where shapes vary (moondream2's crops)."""
        return None

    @abstractmethod
    def prompt_embeds(self, model: Any, decoder: Any, requests: list[EngineRequest],
                      encode: Callable[..., Any]) -> list[torch.Tensor]:
        """[prompt_len, hidden] embeddings per request, images encoded in one batch by ``encode`` (this
        adapter's :meth:`encode_images` for ``model``, graphed where it can be)."""

    @abstractmethod
    def context_length(self, model: Any) -> int: ...

    def min_first_chunk(self, model: Any) -> int:
        """Positions a prompt's first prefill chunk must hold: a prefix that attends both ways (0: none)."""
        return 0

    def accepts(self, task: str | None) -> bool:
        """Whether the engine runs requests of ``task`` (normalized; None: the family's default)."""
        return task is None
