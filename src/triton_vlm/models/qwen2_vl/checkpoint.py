"""Random-weight Qwen2-VL / Qwen2.5-VL checkpoints with a locally trained Qwen2 tokenizer and the real processor
classes: tiny ones for tests (``--tiny``), full-size ones for benchmarks (sizes from :mod:`triton_vlm.bench.checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triton_vlm.models.qwen2_vl.processor import save_processor

#: The two architectures by ``config.model_type`` (the variant names of :meth:`Qwen2VLFamily.build_tiny`).
QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
VARIANTS = (QWEN2_VL, QWEN2_5_VL)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template for what triton-vlm sends (one user turn: images, then text), with its default
# system turn; the real one also renders videos, tool calls and "Picture N:" labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Sizes:
    """What a random checkpoint's config says beyond the token ids: ``text`` and ``vision`` config fields and the
    image processor's."""

    text: dict[str, Any]
    vision: dict[str, Any]
    image_processor: dict[str, Any] = field(default_factory=dict)


# Weights 5x the usual spread: at 0.02 the tiny model says the same two tokens whatever the image and prompt.
_TINY_TEXT = dict(initializer_range=0.1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  # head_dim 16: 8 rotary frequencies split over time, height and width.
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
# 8 px patches merged 2x2: one image token per 16x16 px; images are resized to 16..64 px a side.
_TINY_IMAGES = dict(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2)
TINY: dict[str, Sizes] = {
    QWEN2_VL: Sizes(_TINY_TEXT, dict(initializer_range=0.1, depth=2, embed_dim=32, hidden_size=64, num_heads=2,
                                     mlp_ratio=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
                    _TINY_IMAGES),
    # Windows of 32 px (2x2 merged tokens) in block 0, full attention in block 1: both of 2.5's attentions run.
    QWEN2_5_VL: Sizes(_TINY_TEXT, dict(initializer_range=0.1, depth=2, hidden_size=32, intermediate_size=64,
                                       num_heads=2, out_hidden_size=64, patch_size=8, spatial_merge_size=2,
                                       temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]),
                      _TINY_IMAGES),
}


def train_tokenizer() -> Any:
    """A Qwen2 tokenizer (byte-level BPE, Qwen's special tokens) trained on the tiny corpus."""
    from triton_vlm.tiny import train_qwen2_tokenizer

    tokenizer = train_qwen2_tokenizer(SPECIAL_TOKENS, ["system user assistant", "You are a helpful assistant."])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_random_checkpoint(path: Path, variant: str = QWEN2_VL, sizes: Sizes | None = None, *,
                            vocab_size: int | None = None, dtype: Any = None, device: Any = None) -> None:
    """A random-weight ``variant`` checkpoint at ``path``: :data:`TINY` sizes unless ``sizes`` are given (then a
    ``vocab_size`` too: the tokenizer's ids all lie inside it)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from triton_vlm.tiny import built_as, randomize_qkv_biases, seeded, speak_within

    if variant not in VARIANTS:
        raise ValueError(f"no random build for {variant!r}; known: {', '.join(VARIANTS)}")
    sizes = sizes or TINY[variant]
    tokenizer = train_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(**sizes.image_processor)
    ids = tokenizer.convert_tokens_to_ids
    classes: dict[str, tuple[Any, Any]] = {QWEN2_VL: (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                                           QWEN2_5_VL: (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}
    config_class, model_class = classes[variant]
    config = config_class(
        text_config=dict(sizes.text, vocab_size=vocab_size or len(tokenizer), bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=sizes.vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    seeded()
    with built_as(dtype, device):
        model = model_class(config).eval()
        randomize_qkv_biases(model.model.language_model.layers)
        speak_within(model, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    save_processor(path, image_processor, tokenizer, variant)
