"""Any image-text-to-text model with a chat template (``AutoModelForImageTextToText``): the ``auto`` family.

A new model is a directory with ``model_family: "auto"`` and its ``hf_model_id`` (``triton-vlm add-model``).
The prompt is the processor's chat template over the conversation (a ``prompt`` request: one user turn,
``[image, text]``) with the generation prompt, with as many images per request as the checkpoint's processor
takes (up to ``max_images_per_request``) or none; the shared batched loop (:mod:`triton_vlm.models.generation`)
generates, with left padding and explicit positions:

* RoPE models count positions from 0 over real tokens (Llama, Mistral, Gemma, Idefics3/SmolVLM, LLaVA-NeXT...);
  PaliGemma counts from 1 (:data:`FIRST_POSITION`).
* Multimodal RoPE (Qwen2-VL, Qwen2.5-VL: 3-D positions over time/height/width of the image) is taken from the
  model's own ``get_rope_index`` at prefill; decode steps continue from the last (text) position + 1.

Refused at load with a clear message: checkpoints without a chat template, and the model types in
:data:`UNSUPPORTED`. ``--tiny`` serves a tiny random checkpoint of one of :data:`TINY_BUILDERS`' architectures,
picked from the hub id (:meth:`AutoFamily.tiny_variant`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from triton_vlm.chat import Chat
from triton_vlm.errors import InvalidInputError, ModelLoadError
from triton_vlm.models.base import ModelFamily

#: Position of the first real token where it is not 0 (by ``config.model_type``).
FIRST_POSITION: dict[str, int] = {"paligemma": 1}
#: Model types the shared loop cannot run correctly, and why.
UNSUPPORTED: dict[str, str] = {
    "kosmos-2": "use model_family kosmos2 (fairseq-style positions; grounding output)",
    "mllama": "its cross-attention image layers need a cross-attention mask at every decode step",
    "idefics": "Idefics (v1) attends to the image through perceiver cross-attention layers",
}


class AutoFamily(ModelFamily):
    name = "auto"
    default_hf_model_id = "HuggingFaceTB/SmolVLM-256M-Instruct"
    # Most current VLMs are released in bfloat16.
    auto_cuda_dtype = "bfloat16"

    def model_class(self) -> type[Any]:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def load(self, source: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
             local_files_only: bool, trust_remote_code: bool) -> tuple[Any, Any]:
        model, processor = super().load(source, revision=revision, dtype=dtype, device=device,
                                        local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        model_type = getattr(model.config, "model_type", "?")
        if model_type in UNSUPPORTED:
            raise ModelLoadError(f"{source}: model type {model_type!r} is not served by model_family auto: "
                                 f"{UNSUPPORTED[model_type]}")
        if not getattr(processor, "chat_template", None):
            raise ModelLoadError(f"{source}: its processor has no chat template, which model_family auto needs "
                                 "to build the prompt; use a chat/instruct checkpoint or a dedicated family")
        return model, processor

    # -- prompting ---------------------------------------------------------------------------------------
    def render_prompt(self, processor: Any, prompt: str) -> str:
        check_reserved(processor, [prompt], "prompt")
        return str(super().render_prompt(processor, prompt))

    def render_chat(self, processor: Any, chat: Chat) -> str:
        check_reserved(processor, chat.texts(), "messages")
        return str(super().render_chat(processor, chat))

    # -- stepping ----------------------------------------------------------------------------------------
    def first_position(self, model: Any) -> int:
        return FIRST_POSITION.get(getattr(model.config, "model_type", ""), 0)

    def position_ids(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
        if rope_index is None:
            return super().position_ids(model, inputs)
        # Multimodal RoPE: [3, batch, seq] (time, height, width); padding is masked out by the attention mask.
        accepted = inspect.signature(rope_index).parameters
        extra = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
        positions, _deltas = rope_index(inputs["input_ids"], **extra)
        return positions

    # -- tiny checkpoints --------------------------------------------------------------------------------
    def tiny_variant(self, hf_model_id: str) -> str:
        lowered = hf_model_id.lower()
        for fragment, model_type in TINY_BY_HUB_ID:
            if fragment in lowered:
                return model_type
        return DEFAULT_TINY

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        variant = variant or DEFAULT_TINY
        try:
            builder = TINY_BUILDERS[variant]
        except KeyError:
            raise ValueError(f"no tiny build for model type {variant!r}; known: {', '.join(TINY_BUILDERS)}") from None
        builder(path)


def check_reserved(processor: Any, texts: Iterable[str], param: str) -> None:
    """:class:`InvalidInputError` (naming ``param``) where a text holds one of :func:`reserved_tokens`."""
    reserved = reserved_tokens(processor)
    for text in texts:
        for token in reserved:
            if token in text:
                raise InvalidInputError(f"{param}: may not contain the reserved token {token!r}", param=param)


def reserved_tokens(processor: Any) -> list[str]:
    """Tokens a user prompt may not contain: the processor's image/video placeholders and the tokenizer's
    special tokens (chat-template control tokens such as ``<end_of_utterance>``, ``<|im_end|>``)."""
    tokenizer = processor.tokenizer
    tokens = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    tokens.update(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    tokens.update(str(t) for t in added if getattr(t, "special", False))
    return sorted(t for t in tokens if isinstance(t, str) and t)


# -- tiny builders (random weights, locally trained tokenizer, the real processor classes) -----------------------
#: SmolVLM's chat template (user turn with the image first; "Assistant:" as the generation prompt).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tiny_idefics3(path: Path) -> None:
    """Idefics3 (SmolVLM): SigLIP-style vision, pixel-shuffle connector, Llama text; image splitting on."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaTokenizer
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from triton_vlm.tiny import seeded, train_llama_style_vocab

    vocab, merges = train_llama_style_vocab(vocab_size=600)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                          "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))],
                         special_tokens=True)
    tokenizer.add_special_tokens({"eos_token": "<end_of_utterance>"})  # as SmolVLM-Instruct: a turn ends it
    # 32 px tiles of 8 px patches, pixel shuffle by 2: 4 image tokens per tile; images up to 64 px: 2x2 tiles + 1.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    tokenizer = processor.tokenizer
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    seeded()
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)


#: model type -> tiny builder.
TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "idefics3": _tiny_idefics3,
}
DEFAULT_TINY = "idefics3"
#: Hub id fragment (lower case) -> the tiny model type that stands in for it under --tiny.
TINY_BY_HUB_ID: tuple[tuple[str, str], ...] = (
    ("smolvlm", "idefics3"),
    ("idefics3", "idefics3"),
)
