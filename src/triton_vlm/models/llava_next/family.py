"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP over anyres tiles + projector + image newline, and a
Mistral or Vicuna (Llama) language model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from triton_vlm.models.base import ModelFamily
from triton_vlm.models.llava_common import RESERVED_PROMPT_TOKENS, llava_hf_tokenizer

# llava-v1.6-mistral's chat template, as llava-hf ships it (chat_template.json, with its "</s>" fixed): "[INST]
# <image>\n{prompt} [/INST]"; earlier answers close with "</s>", system text goes in Llama 2's <<SYS>> block, and
# within a message its images come first, one "<image>\n" each, then its text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

#: The tiny checkpoint: CLIP tiles of 30 px (5 x 5 patches of 6 px), and llava-v1.6's five grid shapes scaled
#: from 336 px tiles to 30 (2 x 1, 1 x 2, 2 x 2, 3 x 1, 1 x 3 tiles).
TINY_TILE = 30
TINY_PATCH = 6
TINY_GRID_PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
#: Mistral's sliding window in the tiny checkpoint: shorter than every prompt (an image alone is 35+ positions),
#: so tests see it cut.
TINY_SLIDING_WINDOW = 24


class LlavaNextFamily(ModelFamily):
    name = "llava_next"
    default_hf_model_id = "llava-hf/llava-v1.6-mistral-7b-hf"
    #: The transformers architectures this family serves (``config.json``'s ``architectures``).
    architectures: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    reserved_prompt_tokens = RESERVED_PROMPT_TOKENS
    engine_adapter_class = ("triton_vlm.models.llava_next.engine_adapter", "LlavaNextEngineAdapter")
    # A checkpoint saved without a chat template still gets llava-v1.6-mistral's format.
    fallback_chat_template = CHAT_TEMPLATE

    def model_class(self) -> type[Any]:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        from transformers import (
            CLIPVisionConfig,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessor,
            LlavaNextProcessor,
            MistralConfig,
        )

        from triton_vlm.tiny import seeded

        tokenizer = llava_hf_tokenizer()
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": TINY_TILE}, crop_size={"height": TINY_TILE, "width": TINY_TILE},
            image_grid_pinpoints=TINY_GRID_PINPOINTS)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                                       vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                       image_token="<image>", num_additional_image_tokens=1)
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=TINY_TILE, patch_size=TINY_PATCH,
                                           projection_dim=32),
            text_config=MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=1024, sliding_window=TINY_SLIDING_WINDOW,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=TINY_GRID_PINPOINTS,
            vision_feature_select_strategy="default", vision_feature_layer=-2,
        )
        seeded()
        model = LlavaNextForConditionalGeneration(config).eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        processor.save_pretrained(path)
