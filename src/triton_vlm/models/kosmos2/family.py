"""Kosmos-2 (``Kosmos2ForConditionalGeneration``): CLIP-like vision + perceiver latents + a fairseq-style LM.

Grounding: a prompt starting with ``<grounding>`` makes the model tag phrases of its answer with boxes,
``<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>``. The answer text is cleaned of
those tags (the processor's ``post_process_generation``) and the boxes come back as the optional ``entities``
output: a JSON list of ``{"phrase", "span", "boxes", "boxes_px"}`` (see :func:`grounded_entities`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from triton_vlm.models.base import ModelFamily, cache_kwarg

#: A prompt that ends with a phrase asks where that phrase is: the answer starts with its ``<object>``.
_TRAILING_PHRASE = re.compile(r"<phrase>([^<]*)</phrase>\s*$")


class Kosmos2Family(ModelFamily):
    name = "kosmos2"
    default_hf_model_id = "microsoft/kosmos-2-patch14-224"
    architectures = ("Kosmos2ForConditionalGeneration",)
    # Control tokens of its tokenizer; the grounding tags (<grounding>, <phrase>, ...) stay allowed.
    reserved_prompt_tokens = ("<image>", "</image>", "<s>", "</s>", "<pad>", "<unk>", "<mask>")
    extra_outputs = {"entities": "[]"}
    incremental_text = False  # post_process_generation rewrites the whole text
    engine_adapter_class = ("triton_vlm.models.kosmos2.engine_adapter", "Kosmos2EngineAdapter")
    # One image, in front of the text (its processor's <image>...</image> block); a chat is a transcript
    # (base.transcript: it has no chat format). A forward has image embeddings for every row or for none.
    max_images_per_request = 1
    mixes_text_only_rows = False

    def model_class(self) -> type[Any]:
        from transformers import Kosmos2ForConditionalGeneration

        return Kosmos2ForConditionalGeneration

    def render_prompt(self, processor: Any, prompt: str) -> str:
        # The processor itself wraps the text with <s><image>...</image>; a "<grounding>" prefix asks for boxes.
        return prompt

    # Kosmos-2 numbers positions from padding_idx + 1 and gives pads padding_idx (fairseq); its own decode
    # steps count pads as positions, which is why we pass explicit position ids for left-padded batches.
    def first_position(self, model: Any) -> int:
        return model.config.text_config.pad_token_id + 1

    def pad_position(self, model: Any) -> int:
        return model.config.text_config.pad_token_id

    def prefill(self, model: Any, inputs: dict[str, torch.Tensor], position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        if "pixel_values" in inputs:
            return super().prefill(model, inputs, position_ids, cache)
        # A text-only batch: the language model alone (the whole model's forward insists on an image).
        text_model = model.text_model
        out = text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=position_ids, use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(text_model.forward): cache})
        return out.logits[:, -1, :]

    def decode(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        # The image lives in the cache after prefill; the text model alone continues.
        text_model = model.text_model
        out = text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{cache_kwarg(text_model.forward): cache})
        return out.logits[:, -1, :]

    def decode_text(self, processor: Any, token_ids: list[int]) -> str:
        raw = processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, _entities = processor.post_process_generation(raw, cleanup_and_extract=True)
        return text.strip()

    def decode_output(self, processor: Any, token_ids: list[int], image: Image.Image | None,
                      prompt: str) -> tuple[str, dict[str, str]]:
        raw = processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, entities = grounded_entities(processor, raw, None if image is None else image.size, prompt)
        return text.strip(), {"entities": json.dumps(entities)}

    def build_tiny(self, path: Path, variant: str | None = None) -> None:
        write_random_checkpoint(path)


def write_random_checkpoint(path: Path, *, full_size: bool = False, dtype: Any = None, device: Any = None) -> None:
    """A random-weight Kosmos-2 with a tiny trained tokenizer (the grounding tags included). ``full_size`` takes
    kosmos-2-patch14-224's sizes (transformers' defaults; 224 px images) for benchmarks, where speed depends on
    shapes, not on weight values; the tokenizer's ids all lie inside the real vocabulary."""
    from transformers import (
        CLIPImageProcessor,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
        XLMRobertaTokenizer,
    )

    from triton_vlm.tiny import built_as, seeded, train_unigram_vocab

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = train_unigram_vocab(vocab_size=400, specials=specials)
    tokenizer = XLMRobertaTokenizer(vocab=vocab + [("<mask>", 0.0)])
    side = 224 if full_size else 30
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = Kosmos2Processor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer  # now with the grounding tags and <patch_index_XXXX> tokens
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if full_size:
        config = Kosmos2Config(text_config=dict(vocab_size=max(65037, len(tokenizer)), **ids), latent_query_num=64)
    else:
        config = Kosmos2Config(
            text_config=dict(vocab_size=len(tokenizer), embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                             max_position_embeddings=1024, **ids),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=30, patch_size=6),
            latent_query_num=64,
        )
    seeded()
    with built_as(dtype, device):
        model = Kosmos2ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)


def grounded_entities(processor: Any, raw: str, image_size: tuple[int, int] | None,
                      prompt: str = "") -> tuple[str, list[dict[str, Any]]]:
    """The cleaned answer and its entities, from the decoded answer ``raw`` (location tags still in it).

    Text, phrases, spans and normalized boxes are exactly what ``processor.post_process_generation(raw,
    cleanup_and_extract=True)`` gives: ``span`` is ``[start, end)`` in the cleaned text, ``boxes`` are
    ``{"x_min", "y_min", "x_max", "y_max"}`` in 0..1 of the image the model saw. ``boxes_px`` are the same
    boxes in pixels of the original ``image_size`` (width, height), through the processor's centre crop if it
    crops; none without an image (a text-only turn). An ``<object>`` without its own phrase (the prompt ended with ``<phrase>...</phrase>``) takes the
    prompt's phrase and a zero-width span where it stands; the processor would name it by its patch tokens.
    """
    text, found = processor.post_process_generation(raw, cleanup_and_extract=True)
    trailing = _TRAILING_PHRASE.search(prompt)
    region = None if image_size is None else visible_region(processor.image_processor, *image_size)
    entities = []
    for phrase, (start, end), boxes in found:
        if phrase.startswith("<patch_index_"):
            phrase = trailing.group(1).strip() if trailing else ""
        # The processor shifts spans left by the answer's leading spaces, even a span at the very start.
        start, end = (min(max(int(i), 0), len(text)) for i in (start, end))
        entities.append({
            "phrase": phrase,
            "span": [start, end],
            "boxes": [_box(*box) for box in boxes],
            "boxes_px": [] if region is None else [_box_px(box, region) for box in boxes],
        })
    return text, entities


def visible_region(image_processor: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """``(left, top, width, height)`` in original pixels of the part of a ``width`` x ``height`` image the
    model sees: all of it when the processor resizes to a fixed size (Kosmos-2's 224x224), the centre crop
    when it resizes the shortest edge and then crops (CLIP's default)."""
    size = _as_dict(getattr(image_processor, "size", None))
    crop = _as_dict(getattr(image_processor, "crop_size", None))
    shortest = size.get("shortest_edge")
    if not (getattr(image_processor, "do_center_crop", False) and shortest and crop.get("height")):
        return 0.0, 0.0, float(width), float(height)
    scale = shortest / min(width, height)
    resized_w, resized_h = width * scale, height * scale
    crop_w, crop_h = min(crop["width"], resized_w), min(crop["height"], resized_h)
    return ((resized_w - crop_w) / 2 / scale, (resized_h - crop_h) / 2 / scale, crop_w / scale, crop_h / scale)


def _as_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge") if getattr(size, k, None)}


def _box(x_min: float, y_min: float, x_max: float, y_max: float) -> dict[str, float]:
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def _box_px(box: tuple[float, float, float, float], region: tuple[float, float, float, float]) -> dict[str, float]:
    left, top, width, height = region
    x_min, y_min, x_max, y_max = box
    return _box(round(left + x_min * width, 2), round(top + y_min * height, 2),
                round(left + x_max * width, 2), round(top + y_max * height, 2))
