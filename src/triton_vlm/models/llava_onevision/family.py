"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower over anyres tiles, a projector, the
image newline, and a Qwen2 language model (q/k/v biases).

Like LLaVA-NeXT, a single image becomes its base view plus the tiles of the ``image_grid_pinpoints`` grid that fits
it best, unpadded to its aspect ratio with a newline after each row of features; OneVision then shrinks a grid with
more than ``anyres_max_N`` tiles' worth of features (bilinear), and an image of a request with several is its whole
view alone (one tile and a newline). The processor expands each ``<image>`` to that many rows. The prompt is the
checkpoint's chat template (llava-hf's: ``<|im_start|>user <image>\\n...<|im_end|><|im_start|>assistant\\n``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from triton_vlm.models.base import ModelFamily
from triton_vlm.models.llava_common import IMAGE_TOKEN

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json: "<|im_start|>" + role + " ", the message's images
# (one "<image>" each, then videos), its text parts each after a "\n", "<|im_end|>" (no newline after it), and
# "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Qwen2's control tokens and llava-hf's placeholders, in the order of their ids (151643.. in the real vocabulary).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<video>"]


@dataclass(frozen=True)
class Sizes:
    """A random checkpoint's architecture beyond its token ids: ``text`` (Qwen2Config) and ``vision``
    (SiglipVisionConfig, whose ``image_size`` is the tile) fields, the grids and the ``anyres_max`` limit."""

    text: dict[str, Any]
    vision: dict[str, Any]
    grid_pinpoints: list[list[int]]
    vision_aspect_ratio: str


def grids(tile: int, most: int) -> list[list[int]]:
    """Every grid of 1 to ``most`` tiles a side, in pixels, as OneVision's ``image_grid_pinpoints`` lists them."""
    return [[tile * rows, tile * columns] for rows in range(1, most + 1) for columns in range(1, most + 1)]


#: The tiny checkpoint: 32 px tiles of 8 px patches (16 features a tile), grids of 1 to 3 tiles a side, and at most 4
#: tiles' worth of features an image (``anyres_max_4``), so a 2 x 3 or 3 x 3 grid is shrunk: the tests meet both
#: of OneVision's packings. Text weights drawn 5x wider than the default, as qwen2_vl's: at 0.02 the tiny model says
#: the same tokens whatever the image and prompt.
TINY_TILE = 32
TINY = Sizes(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
              tie_word_embeddings=False),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=TINY_TILE, patch_size=8, vision_use_head=False),
    grid_pinpoints=grids(TINY_TILE, 3), vision_aspect_ratio="anyres_max_4")


class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    default_hf_model_id = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    #: The transformers architectures this family serves (``config.json``'s ``architectures``).
    architectures: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    # A user's "<|im_end|>" would end the turn, an "<image>" ask for another image.
    reserved_prompt_tokens = tuple(SPECIAL_TOKENS)
    engine_adapter_class = ("triton_vlm.models.llava_onevision.engine_adapter", "LlavaOnevisionEngineAdapter")
    # A checkpoint saved without a chat template still gets llava-hf's OneVision format.
    fallback_chat_template = CHAT_TEMPLATE

    def model_class(self) -> type[Any]:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        """The model, and its processor built without a video processor where torchvision is missing
        (:mod:`triton_vlm.models.processors`)."""
        from transformers import LlavaOnevisionProcessor

        from triton_vlm.models.processors import load_processor

        common = dict(revision=revision, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        model = self.model_class().from_pretrained(source, dtype=dtype, use_safetensors=True, **common)
        model.to(device).eval()
        processor = load_processor(source, LlavaOnevisionProcessor, **common)
        processor.tokenizer.padding_side = "left"
        return model, processor

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        write_random_checkpoint(path)


def processor_settings(sizes: Sizes) -> dict[str, Any]:
    """The processor's own settings (``processor_config.json``): features per tile (SigLIP has no CLS: the "full"
    strategy keeps them all) and the ``anyres_max`` limit, the model's."""
    patches = sizes.vision["image_size"] // sizes.vision["patch_size"]
    return {"num_image_tokens": patches * patches, "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": sizes.vision_aspect_ratio}


def random_processor(sizes: Sizes = TINY) -> Any:
    """A LLaVA-OneVision processor for ``sizes`` (tiles, grids, limit) with the PIL image processor, OneVision's chat
    template and a Qwen2 tokenizer trained on the tiny corpus (built without a video processor, torchvision or not:
    :func:`~triton_vlm.models.processors.images_only`)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from triton_vlm.models.processors import images_only
    from triton_vlm.tiny import train_qwen2_tokenizer

    tokenizer = train_qwen2_tokenizer(SPECIAL_TOKENS, ["system user assistant"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tile = sizes.vision["image_size"]
    # SigLIP's normalization (mean and std 0.5), as OneVision's preprocessor_config.json has it.
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                      image_grid_pinpoints=sizes.grid_pinpoints,
                                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return images_only(LlavaOnevisionProcessor, image_processor, tokenizer, CHAT_TEMPLATE,
                       **processor_settings(sizes))


def random_config(sizes: Sizes, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """The ``LlavaOnevisionConfig`` of ``sizes`` with ``tokenizer``'s ids; ``vocab_size`` (default: the tokenizer's)
    must hold them."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**sizes.vision),
        text_config=Qwen2Config(**sizes.text, vocab_size=vocab_size or len(tokenizer),
                                bos_token_id=ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=ids(IMAGE_TOKEN), video_token_index=ids("<video>"),
        image_grid_pinpoints=sizes.grid_pinpoints, vision_aspect_ratio=sizes.vision_aspect_ratio,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=sizes.text["tie_word_embeddings"])


def write_random_checkpoint(path: Path, sizes: Sizes = TINY, *, vocab_size: int | None = None, dtype: Any = None,
                            device: Any = None) -> None:
    """A random-weight LLaVA-OneVision at ``path`` (:func:`random_processor`'s processor): :data:`TINY` sizes, or
    full-size ``sizes`` with the real ``vocab_size`` (the tokenizer's ids all lie inside it) for benchmarks, built
    in ``dtype`` on ``device``."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    from triton_vlm.models.processors import save_processor
    from triton_vlm.tiny import built_as, randomize_qkv_biases, seeded, speak_within

    processor = random_processor(sizes)
    config = random_config(sizes, processor.tokenizer, vocab_size)
    seeded()
    with built_as(dtype, device):
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        randomize_qkv_biases(model.model.language_model.layers)
        speak_within(model, processor.tokenizer)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(path)
    save_processor(path, LlavaOnevisionProcessor, processor.image_processor, processor.tokenizer,
                   **processor_settings(sizes))
