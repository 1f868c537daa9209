"""What the engine needs from a model family: tokenized prompts, prompt embeddings, a decoder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from triton_vlm.engine.llama import LlamaDecoder
from triton_vlm.engine.request import EngineRequest


class EngineAdapter(ABC):
    @abstractmethod
    def prepare(self, family: Any, processor: Any, image: Any, prompt: str) -> tuple[list[int], dict[str, Any]]:
        """Prompt token ids (image placeholders expanded) and the multimodal inputs for one request."""

    @abstractmethod
    def build_decoder(self, model: Any) -> LlamaDecoder: ...

    @abstractmethod
    def prompt_embeds(self, model: Any, decoder: LlamaDecoder, requests: list[EngineRequest]) -> list[torch.Tensor]:
        """[prompt_len, hidden] embeddings per request, images encoded in one batch."""

    @abstractmethod
    def context_length(self, model: Any) -> int: ...
