"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP vision tower + projector + Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triton_vlm.models.base import ModelFamily
from triton_vlm.models.llava_common import IMAGE_TOKEN, RESERVED_PROMPT_TOKENS

# LLaVA-1.5's conversation format, as llava-hf's checkpoints ship it: "USER: <image>\n{prompt} ASSISTANT:", earlier
# turns before it ("USER: ... ASSISTANT: ... "), system text in front without a role. Within a message its images
# come first, one "<image>\n" each (several images: several placeholders in one prompt), then its text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LlavaFamily(ModelFamily):
    name = "llava"
    default_hf_model_id = "llava-hf/llava-1.5-7b-hf"
    architectures = ("LlavaForConditionalGeneration",)
    reserved_prompt_tokens = RESERVED_PROMPT_TOKENS
    engine_adapter_class = ("triton_vlm.models.llava.engine_adapter", "LlavaEngineAdapter")
    # A checkpoint saved without a chat template (older llava-hf revisions) still gets LLaVA-1.5's format.
    fallback_chat_template = CHAT_TEMPLATE

    def model_class(self) -> type[Any]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlamaTokenizer,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        from triton_vlm.tiny import seeded, train_llama_style_vocab

        vocab, merges = train_llama_style_vocab(vocab_size=600)
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
        # llava-hf appends <image> and <pad> after the Llama vocabulary; so do we.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=6,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=30, patch_size=6, projection_dim=32),
            text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                    max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            image_token_index=tokenizer.get_vocab()[IMAGE_TOKEN],
            vision_feature_select_strategy="default", vision_feature_layer=-2,
        )
        seeded()
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        processor.save_pretrained(path)
