"""What the LLaVA-style families (``llava``, ``llava_next``) share: the ``<image>`` placeholder and the tokens a
prompt may not hold, the one-image user turn, llava-hf's tokenizer layout, and the engine adapter base for a
transformers model whose processor expands ``<image>`` into one token per feature and whose language model is
Llama-shaped (``model.model.language_model`` + ``model.lm_head``). Each family adds what differs: its prompt
fallback, its checkpoints, how its images become features."""

from __future__ import annotations

from typing import Any

import torch

from triton_vlm.engine.adapter import Decoder, EngineAdapter, vision_tower_shape

IMAGE_TOKEN = "<image>"
# The tokenizer turns these into control tokens wherever they appear in the text: a user's "</s>" would end the
# prompt early, a "<image>" would ask for a second image.
RESERVED_PROMPT_TOKENS = (IMAGE_TOKEN, "<s>", "</s>", "<unk>", "<pad>")


def image_prompt(processor: Any, prompt: str, fallback: str) -> str:
    """One user turn of an image then ``prompt``, through the processor's chat template where it has one, else
    ``fallback`` (a format string over ``{image}`` and ``{prompt}``)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        return str(processor.apply_chat_template(conversation, add_generation_prompt=True))
    return fallback.format(image=IMAGE_TOKEN, prompt=prompt)


def llava_hf_tokenizer(pad_to: int | None = None) -> Any:
    """A Llama-style tokenizer trained on :data:`triton_vlm.tiny.CORPUS` with llava-hf's additions after the
    vocabulary, ``<image>`` then ``<pad>``: 32000 and 32001 with ``pad_to=32000``, as in llava-hf's 7B
    checkpoints."""
    from transformers import LlamaTokenizer

    from triton_vlm.tiny import train_llama_style_vocab

    vocab, merges = train_llama_style_vocab(vocab_size=600, pad_to=pad_to)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


class ImageTokenEngineAdapter(EngineAdapter):
    """The engine over a transformers LLaVA-style model: the processor expands ``<image>``, the features go to
    those rows, and the engine's :class:`~triton_vlm.engine.decoders.llama.LlamaDecoder` runs the language model
    (Llama or Mistral: its sliding window is read from the config)."""

    def prepare(self, family: Any, processor: Any, image: Any, prompt: str) -> tuple[list[int], dict[str, Any]]:
        """The processor's outputs for one request: ``pixel_values`` and whatever else it gives for the image
        (``image_sizes``), and ``image_rows``, the expanded ``<image>`` rows."""
        encoded = processor(images=[image], text=[family.render_prompt(processor, prompt)], return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        inputs = {key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")}
        return ids, {**inputs, "image_rows": [row for row, token in enumerate(ids) if token == image_token]}

    def build_decoder(self, model: Any) -> Decoder:
        # Here, not at the top: the families import this module, and the decoder brings in the Triton kernels.
        from triton_vlm.engine.decoders.llama import LlamaDecoder

        return LlamaDecoder(model.model.language_model, model.lm_head)

    def image_shape(self, model: Any) -> tuple[int, ...]:
        return vision_tower_shape(model.config.vision_config)

    def context_length(self, model: Any) -> int:
        return int(model.config.text_config.max_position_embeddings)


def pooled(features: Any) -> Any:
    """``get_image_features``' result as a tensor or list of tensors: transformers >= 5.2x returns a model output
    that holds them as ``pooler_output``."""
    if isinstance(features, (torch.Tensor, list, tuple)):
        return features
    return features.pooler_output
