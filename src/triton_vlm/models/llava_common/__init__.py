"""What the LLaVA-style families (``llava``, ``llava_next``, ``llava_onevision``) share: the ``<image>`` placeholder
and the tokens a prompt may not hold (Llama tokenizers'; OneVision's Qwen2 has its own), llava-hf's tokenizer layout,
and the engine adapter bases (anyres tiles for llava_next and llava_onevision) for a
transformers model whose processor expands ``<image>`` into one token per feature and whose language model is
Llama-shaped (``model.model.language_model`` + ``model.lm_head``; in :mod:`.engine_adapter`, which only engine
hosts import). Each family adds what differs: its chat template (the fallback where a checkpoint has none), its
checkpoints, how its images become features."""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"
# The tokenizer turns these into control tokens wherever they appear in the text: a user's "</s>" would end the
# prompt early, a "<image>" would ask for a second image.
RESERVED_PROMPT_TOKENS = (IMAGE_TOKEN, "<s>", "</s>", "<unk>", "<pad>")


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
