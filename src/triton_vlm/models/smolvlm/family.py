"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``): a SigLIP
vision tower, a pixel-shuffle connector and a Llama language model (SmolLM2, Llama 3).

The processor splits an image into tiles of ``max_image_size`` plus one downscaled global view, each tile
``image_seq_len`` ``<image>`` tokens in the prompt between ``<fake_token_around_image>`` and a
``<row_i_col_j>``/``<global-img>`` tag. The prompt is the checkpoint's chat template over the conversation
(``ModelFamily.render_chat``; a ``prompt`` request is one user turn ``[image, text]``), with several images per
request (each split into its own tiles) or none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from triton_vlm.errors import ModelLoadError
from triton_vlm.models.base import ModelFamily

#: ``config.model_type`` of the checkpoints this family runs.
MODEL_TYPES = ("idefics3", "smolvlm")

#: SmolVLM's chat template (user turn with the image first; "Assistant:" as the generation prompt).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class SmolVLMFamily(ModelFamily):
    name = "smolvlm"
    default_hf_model_id = "HuggingFaceTB/SmolVLM-256M-Instruct"
    #: The ``architectures`` of a checkpoint's config.json this family serves.
    architectures: ClassVar[tuple[str, ...]] = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    auto_cuda_dtype = "bfloat16"  # SmolVLM and Idefics3 are released in bfloat16
    engine_adapter_class = ("triton_vlm.models.smolvlm.engine_adapter", "SmolVLMEngineAdapter")
    # The chat template's control tokens (<end_of_utterance>, <fake_token_around_image>...) are the tokenizer's.
    reserves_processor_tokens = True

    def model_class(self) -> type[Any]:
        # Idefics3ForConditionalGeneration or SmolVLMForConditionalGeneration, by the checkpoint's model type.
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        model, processor = super().load(source, revision=revision, dtype=dtype, device=device,
                                        local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in MODEL_TYPES:
            raise ModelLoadError(f"{source}: model type {model_type!r} is not an Idefics3/SmolVLM checkpoint "
                                 f"(model_family smolvlm serves {', '.join(MODEL_TYPES)}; try model_family auto)")
        if not getattr(processor, "chat_template", None):
            raise ModelLoadError(f"{source}: its processor has no chat template; use an instruct checkpoint")
        return model, processor

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        write_random_checkpoint(path)


def write_random_checkpoint(path: Path, *, full_size: bool = False, geometry: bool = False, dtype: Any = None,
                            device: Any = None) -> None:
    """A random-weight Idefics3 with SmolVLM's processor and chat template and a tiny trained tokenizer.

    Tiny: 32 px tiles of 8 px patches, pixel shuffle by 2 (4 ``<image>`` tokens per tile); images are resized to 64
    px on their longest edge, so most split into 2 or 2x2 tiles plus the global view. ``full_size`` takes
    HuggingFaceTB/SmolVLM-Instruct's shapes for benchmarks (speed depends on shapes, not weight values): see
    :func:`smolvlm_instruct_config`; the tokenizer's ids all lie inside its vocabulary. ``geometry``: the real
    processor and image geometry (1536 px, 384 px tiles of 81 rows: 1377 rows for a square image) over the tiny
    model, for measuring the host's share of a request on a CPU."""
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor, LlamaTokenizer
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from triton_vlm.tiny import built_as, seeded, speak_within, train_llama_style_vocab

    vocab, merges = train_llama_style_vocab(vocab_size=600)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                          "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))],
                         special_tokens=True)
    tokenizer.add_special_tokens({"eos_token": "<end_of_utterance>"})  # as SmolVLM-Instruct: a turn ends it
    tile, longest = (384, 1536) if full_size or geometry else (32, 64)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                                do_image_splitting=True)
    config = (smolvlm_instruct_config(tokenizer) if full_size
              else tiny_config(tokenizer, image_size=384, patch_size=14, scale_factor=3) if geometry
              else tiny_config(tokenizer))
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len(config), chat_template=CHAT_TEMPLATE)
    seeded()
    with built_as(dtype, device):
        model = Idefics3ForConditionalGeneration(config).eval()
        speak_within(model, tokenizer)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)


def image_seq_len(config: Any) -> int:
    """``<image>`` tokens per tile: the tower's patches, fewer by ``scale_factor`` squared (the pixel shuffle)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return int(side * side // config.scale_factor**2)


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def tiny_config(tokenizer: Any, *, image_size: int = 32, patch_size: int = 8, scale_factor: int = 2) -> Any:
    """The tiny test architecture; rope_theta as SmolVLM-Instruct's, tied embeddings as SmolVLM-256M/500M's.
    Weights drawn 10x wider than transformers' default (std 0.2): at 0.02 the two tied layers answer one token
    whatever the image and prompt, and tests comparing token ids would then prove nothing. The tile geometry
    (``image_size``, ``patch_size``, ``scale_factor``) is the tiny tests' unless given."""
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, rope_theta=273768.0, tie_word_embeddings=True,
                         initializer_range=0.2, **_token_ids(tokenizer)),
        scale_factor=scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
    )


def smolvlm_instruct_config(tokenizer: Any) -> Any:
    """HuggingFaceTB/SmolVLM-Instruct's architecture (its config.json and processor_config.json, as published in
    Nov 2024; written from memory, no hub here): vision SigLIP so400m-like (1152 hidden, 4304 MLP, 27 layers, 16
    heads, patch 14, 384 px: 27x27 patches), connector scale_factor 3 (81 tokens per 384 px tile), text SmolLM2-1.7B
    (2048 hidden, 8192 MLP, 24 layers, 32 heads, 32 KV heads, rope_theta 273768, 16384 positions, vocab 49155,
    untied lm_head). Its processor resizes to 1536 px on the longest edge (``size``) and splits into 384 px tiles
    (``max_image_size``): up to 4x4 tiles and the global view, 17 x 81 = 1377 image tokens."""
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=max(49155, len(tokenizer)),
                         max_position_embeddings=16384, rope_theta=273768.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, **_token_ids(tokenizer)),
        scale_factor=3, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
