"""Full-size model architectures with random weights, for benchmarks where real weights can't be downloaded.

Speed depends on shapes, not on weight values, so llava-1.5-7b's exact config with random fp16 weights runs
as fast as the real thing. The processor is the real one's kind (CLIP 336 px, a Llama-style tokenizer with
the same 32000-piece id space, ``<image>`` = 32000, ``<pad>`` = 32001); so is llava-v1.6-mistral-7b's (LLaVA-NeXT:
anyres tiles of 336 px, a Mistral decoder). kosmos-2, moondream2 and SmolVLM-Instruct (smolvlm: Idefics3 with SigLIP
so400m and SmolLM2-1.7B, ``models/smolvlm/family.py:smolvlm_instruct_config``) come at their real sizes with the tiny
checkpoints' tokenizers (ids inside the real vocabularies); so do Qwen2-VL-7B-Instruct (``qwen2_vl``) and
Qwen2.5-VL-7B-Instruct (``qwen2_5_vl``), with their real image processors' pixel bounds, and
llava-onevision-qwen2-7b-ov (``llava_onevision``: SigLIP so400m at 384 px over anyres grids up to 6 x 6, Qwen2-7B),
with its real grids and ``anyres_max_9``. Where a tiny tokenizer sits under a real vocabulary, the output rows of the
ids it lacks are zero (:func:`~triton_vlm.tiny.speak_within`): greedy random weights then answer in text, streamed
piece by piece, not in ids that decode to nothing until the end.

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


def random_llava_geometry(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, processor)``: llava-1.5-7b's processor and geometry (336 px images in 576 rows, the same prompt
    lengths and tokenizer) over a tiny random model. What a first token costs on the host (decoding, the processor,
    tokenizing, the engine's bookkeeping), measurable on a CPU, where the real model's prefill would drown it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=2, pad_token_id=32001)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return _random_llava_like(LlavaForConditionalGeneration, config, llava_7b_processor(), device, dtype)


#: The random models built in memory (the others are written by their family): full-size, and llava's geometry
#: over a tiny model (``llava_geometry``, fp32, for CPUs).
IN_MEMORY = {"llava": random_llava_7b, "llava_next": random_llava_next_7b, "llava_geometry": random_llava_geometry}


def qwen_vl_7b_sizes(variant: str) -> Any:
    """Qwen2-VL-7B-Instruct's (``qwen2_vl``) or Qwen2.5-VL-7B-Instruct's (``qwen2_5_vl``) sizes, from their
    ``config.json`` and ``preprocessor_config.json`` on the Hub (written from those files, not downloaded here)."""
    from triton_vlm.models.qwen2_vl.checkpoint import QWEN2_5_VL, Sizes

    # Both: a Qwen2-7B decoder (hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, RMSNorm 1e-6,
    # rope_theta 1e6, mrope_section [16, 24, 24], untied lm_head) over vocab 152064; 14 px patches merged 2x2;
    # 3136..12845056 pixels an image (min_pixels, max_pixels); contexts 32768 (2) and 128000 (2.5).
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                max_position_embeddings=128000 if variant == QWEN2_5_VL else 32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    images = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2)
    if variant == QWEN2_5_VL:
        # 32 blocks of 1280 (SwiGLU 3420, 16 heads), windows of 112 px but in blocks 7, 15, 23, 31; out 3584.
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    else:
        # 32 blocks of 1280 (MLP ratio 4, 16 heads), merged into 3584.
        vision = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
    return Sizes(text, vision, images)


#: Full-size Qwen VL checkpoints by model name; the vocabulary is the real one.
QWEN_VL_VOCAB = 152064
QWEN_VL_MODELS = ("qwen2_vl", "qwen2_5_vl")


def llava_onevision_7b_sizes() -> Any:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's sizes, from its ``config.json`` and ``preprocessor_config.json`` on
    the Hub (written from those files, not downloaded here): SigLIP so400m less its last layer (1152 hidden, 4304
    MLP, 26 layers, 16 heads, 14 px patches at 384 px: 729 features a tile, no pooling head), grids of 1 to 6 tiles
    of 384 px a side, ``anyres_max_9``, and Qwen2-7B-Instruct (hidden 3584, 28 layers, 28 heads, 4 KV heads,
    intermediate 18944, RMSNorm 1e-6, rope_theta 1e6, 32768 positions, untied lm_head; no sliding window)."""
    from triton_vlm.models.llava_onevision.family import Sizes, grids

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}, use_sliding_window=False,
                tie_word_embeddings=False)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                  image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  vision_use_head=False)
    return Sizes(text, vision, grids(384, 6), "anyres_max_9")


#: llava-onevision-qwen2-7b-ov's vocabulary (Qwen2's 151643 pieces, its control tokens, ``<image>``, ``<video>``,
#: padded to a multiple of 64).
LLAVA_ONEVISION_VOCAB = 152128


def save_random_full_size(model: str, path: Path, device: torch.device) -> Path:
    """Write ``model``'s full-size random fp16 checkpoint (llava, llava_next, llava_onevision, kosmos2, moondream2,
    smolvlm, qwen2_vl or qwen2_5_vl) to ``path``, so a server loads it the real way (llava's: 13.5 GB in fp16;
    llava_next's: 15 GB; llava_onevision's: 16 GB); or a real processor over a tiny model (``llava_geometry``,
    ``smolvlm_geometry``: fp32, for CPUs)."""
    path.mkdir(parents=True, exist_ok=True)
    if model in IN_MEMORY:
        loaded, processor = IN_MEMORY[model](device)
        loaded.save_pretrained(path)
        processor.save_pretrained(path)
        return path
    if model in QWEN_VL_MODELS:
        from triton_vlm.models.qwen2_vl.checkpoint import write_random_checkpoint

        write_random_checkpoint(path, model, qwen_vl_7b_sizes(model), vocab_size=QWEN_VL_VOCAB,
                                dtype=torch.float16, device=device)
        return path
    if model == "llava_onevision":
        from triton_vlm.models.llava_onevision.family import write_random_checkpoint as write_onevision

        write_onevision(path, llava_onevision_7b_sizes(), vocab_size=LLAVA_ONEVISION_VOCAB, dtype=torch.float16,
                        device=device)
        return path
    if model == "smolvlm_geometry":  # SmolVLM-Instruct's processor over the tiny model (fp32, for CPUs)
        from triton_vlm.models.smolvlm.family import write_random_checkpoint as write_smolvlm

        write_smolvlm(path, geometry=True)
        return path
    if model not in ("kosmos2", "moondream2", "smolvlm"):
        raise ValueError(f"no full-size random checkpoint for {model!r} (llava, llava_next, llava_onevision, "
                         f"kosmos2, moondream2, smolvlm, {', '.join(QWEN_VL_MODELS)}; llava_geometry, "
                         "smolvlm_geometry)")
    family = importlib.import_module(f"triton_vlm.models.{model}.family")
    family.write_random_checkpoint(path, full_size=True, dtype=torch.float16, device=device)
    return path


def load_random_full_size(model: str, device: torch.device) -> tuple[Any, Any, Any]:
    """``(family, model, processor)``: ``model``'s full-size random fp16 architecture on ``device``. llava and
    llava_next are built in memory; the others are written to a temporary checkpoint and loaded the way a server
    loads them."""
    import tempfile

    from triton_vlm.models import get_family

    family = get_family("qwen2_vl" if model in QWEN_VL_MODELS else model)
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
