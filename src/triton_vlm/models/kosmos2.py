"""Kosmos-2 (``Kosmos2ForConditionalGeneration``): CLIP-like vision + perceiver latents + a fairseq-style LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from triton_vlm.models.base import ModelFamily, cache_kwarg


class Kosmos2Family(ModelFamily):
    name = "kosmos2"
    default_hf_model_id = "microsoft/kosmos-2-patch14-224"
    # Control tokens of its tokenizer; the grounding tags (<grounding>, <phrase>, ...) stay allowed.
    reserved_prompt_tokens = ("<image>", "</image>", "<s>", "</s>", "<pad>", "<unk>", "<mask>")

    def model_class(self) -> type:
        from transformers import Kosmos2ForConditionalGeneration

        return Kosmos2ForConditionalGeneration

    def render_prompt(self, processor: Any, prompt: str) -> str:
        # The processor itself wraps the text with <s><image>...</image>; a "<grounding>" prefix asks for boxes.
        return prompt

    # Kosmos-2 numbers positions from padding_idx + 1 and gives pads padding_idx (fairseq); its own decode
    # steps count pads as positions, which is why we pass explicit position ids for left-padded batches.
    def first_position(self, model: Any) -> int:
        return model.config.text_config.pad_token_id + 1

    def pad_position(self, model: Any) -> int:
        return model.config.text_config.pad_token_id

    def decode(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        # The image lives in the cache after prefill; the text model alone continues.
        text_model = model.text_model
        out = text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{cache_kwarg(text_model.forward): cache})
        return out.logits[:, -1, :]

    def decode_text(self, processor: Any, token_ids: list[int]) -> str:
        raw = processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, _entities = processor.post_process_generation(raw, cleanup_and_extract=True)
        return text.strip()

    def build_tiny(self, path: Path) -> None:
        from transformers import (CLIPImageProcessor, Kosmos2Config, Kosmos2ForConditionalGeneration,
                                  Kosmos2Processor, XLMRobertaTokenizer)

        from triton_vlm.tiny import seeded, train_unigram_vocab

        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        vocab = train_unigram_vocab(vocab_size=400, specials=specials)
        tokenizer = XLMRobertaTokenizer(vocab=vocab + [("<mask>", 0.0)])
        image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        processor = Kosmos2Processor(image_processor=image_processor, tokenizer=tokenizer)
        tokenizer = processor.tokenizer  # now with the grounding tags and <patch_index_XXXX> tokens
        config = Kosmos2Config(
            text_config=dict(vocab_size=len(tokenizer), embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                             max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=30, patch_size=6),
            latent_query_num=64,
        )
        seeded()
        model = Kosmos2ForConditionalGeneration(config).eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        processor.save_pretrained(path)
