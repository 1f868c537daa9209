"""Full-size model architectures with random weights, for benchmarks where real weights can't be downloaded.

Speed depends on shapes, not on weight values, so llava-1.5-7b's exact config with random fp16 weights runs
as fast as the real thing. The processor is the real one's kind (CLIP 336 px, a Llama-style tokenizer with
the same 32000-piece id space, ``<image>`` = 32000, ``<pad>`` = 32001); so is llava-v1.6-mistral-7b's (LLaVA-NeXT:
anyres tiles of 336 px, a Mistral decoder). kosmos-2 and moondream2 come at their real sizes with the tiny checkpoints' tokenizers (ids inside the real vocabularies).

``python -m triton_vlm.bench.checkpoints MODEL PATH`` writes one (on the GPU when there is one).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch


def llava_7b_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-2)


def llava_7b_processor() -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    from triton_vlm.models.llava import CHAT_TEMPLATE, IMAGE_TOKEN
    from triton_vlm.models.llava_common import llava_hf_tokenizer

    tokenizer = llava_hf_tokenizer(pad_to=32000)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def random_llava_7b(device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[Any, Any]:
    """``(model, processor)`` with llava-1.5-7b's architecture and random weights, built on ``device``."""
    from transformers import LlavaForConditionalGeneration

    return _random_llava_like(LlavaForConditionalGeneration, llava_7b_config(), llava_7b_processor(), device, dtype)


#: llava-hf/llava-v1.6-mistral-7b-hf's config.json (LLaVA-NeXT, 2024-03): CLIP ViT-L/14 at 336 px, tiles on the
#: grids ``image_grid_pinpoints``, the image newline, and Mistral-7B-Instruct-v0.2 (hidden 4096, 32 layers, 32
#: heads, 8 KV heads, intermediate 14336, rope_theta 1e6, 32768 positions, ``sliding_window: null``) over a vocabulary
#: of 32064 (``<image>`` 32000, ``<pad>`` 32001).
LLAVA_NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next_7b_config() -> Any:
    from transformers import LlavaNextConfig, MistralConfig

    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return LlavaNextConfig(vision_config=llava_7b_config().vision_config, text_config=text,
                           image_token_index=32000, projector_hidden_act="gelu",
                           vision_feature_select_strategy="default", vision_feature_layer=-2,
                           image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS, tie_word_embeddings=False)


def llava_next_7b_processor() -> Any:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from triton_vlm.models.llava_common import IMAGE_TOKEN, llava_hf_tokenizer
    from triton_vlm.models.llava_next import CHAT_TEMPLATE

    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=llava_hf_tokenizer(pad_to=32000),
                              patch_size=14, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def random_llava_next_7b(device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[Any, Any]:
    """``(model, processor)`` with llava-v1.6-mistral-7b's architecture and random weights, built on ``device``."""
    from transformers import LlavaNextForConditionalGeneration

    return _random_llava_like(LlavaNextForConditionalGeneration, llava_next_7b_config(), llava_next_7b_processor(),
                              device, dtype)


def _random_llava_like(model_class: Any, config: Any, processor: Any, device: torch.device,
                       dtype: torch.dtype) -> tuple[Any, Any]:
    from triton_vlm.tiny import built_as

    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 32000
    with built_as(dtype, device):
        model = model_class(config)
    model.eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 32001
    processor.tokenizer.padding_side = "left"
    return model, processor


#: The full-size random models built in memory (the others are written by their family).
IN_MEMORY = {"llava": random_llava_7b, "llava_next": random_llava_next_7b}


def save_random_full_size(model: str, path: Path, device: torch.device) -> Path:
    """Write ``model``'s full-size random fp16 checkpoint (llava, llava_next, kosmos2 or moondream2) to ``path``, so
    a server loads it the real way (llava's: 13.5 GB in fp16; llava_next's: 15 GB)."""
    path.mkdir(parents=True, exist_ok=True)
    if model in IN_MEMORY:
        loaded, processor = IN_MEMORY[model](device)
        loaded.save_pretrained(path)
        processor.save_pretrained(path)
        return path
    if model not in ("kosmos2", "moondream2"):
        raise ValueError(f"no full-size random checkpoint for {model!r} (llava, llava_next, kosmos2, moondream2)")
    family = importlib.import_module(f"triton_vlm.models.{model}.family")
    family.write_random_checkpoint(path, full_size=True, dtype=torch.float16, device=device)
    return path


def load_random_full_size(model: str, device: torch.device) -> tuple[Any, Any, Any]:
    """``(family, model, processor)``: ``model``'s full-size random fp16 architecture on ``device``. llava and
    llava_next are built in memory; kosmos2 and moondream2 are written to a temporary checkpoint and loaded the way a
    server loads them."""
    import tempfile

    from triton_vlm.models import get_family

    family = get_family(model)
    if model in IN_MEMORY:
        return (family, *IN_MEMORY[model](device))
    with tempfile.TemporaryDirectory(prefix=f"{model}-random-") as tmp:
        path = save_random_full_size(model, Path(tmp), device)
        loaded, processor = family.load(str(path), revision=None, dtype=torch.float16, device=device,
                                        local_files_only=True, trust_remote_code=False)
    return family, loaded, processor


if __name__ == "__main__":
    import sys
    import time

    start = time.perf_counter()
    name, target = sys.argv[1], Path(sys.argv[2])
    save_random_full_size(name, target, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"random full-size {name} checkpoint written to {target} in {time.perf_counter() - start:.0f}s", flush=True)
