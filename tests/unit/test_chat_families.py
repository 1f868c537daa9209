"""Chats on the families merged with issue 23 (qwen2_vl, llava_next, smolvlm) and on llava_onevision: each renders a conversation exactly as
its processor's ``apply_chat_template`` does, and answers text-only turns and two images in one request with the
same tokens through transformers' ``generate``, the batched loop (alone and batched with other kinds of rows) and
the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from triton_vlm.chat import Chat, parse_messages
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.generation import generate_batch
from triton_vlm.sampling import SamplingParams

from .helpers import load_tiny, noise

FAMILIES = ["qwen2_vl", "llava_next", "smolvlm", "llava_onevision"]
#: Two turns: a question about an image, its answer, then a follow-up showing a second image after the text.
TWO_TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
]
TWO_TURNS_HF = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
]
TEXT_ONLY = [{"role": "user", "content": "Tell me a story about a red bicycle."}]
#: Two images of different shapes (different patch grids, tile counts and anyres grids in each family).
IMAGES = [noise(40, 30, 1), noise(30, 64, 2)]


def chat(messages: list[dict[str, Any]], images: int = 0) -> Chat:
    return parse_messages(json.dumps(messages), images)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request: pytest.FixtureRequest) -> tuple[Any, Any, Any]:
    return load_tiny(request.param)


def hf_generate(loaded: tuple[Any, Any, Any], images: list[Any], conversation: Chat, max_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` on the processor's own outputs for one request, up to the stop token."""
    family, model, processor = loaded
    text = processor.apply_chat_template(conversation.hf_messages(), add_generation_prompt=True)
    inputs = (processor(images=[images], text=[text], return_tensors="pt") if images
              else processor(text=[text], return_tensors="pt"))
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = family.stop_token_ids(model, processor)
    return next((new[:i] for i, token in enumerate(new) if token in stops), new)


def test_a_chat_renders_as_the_processors_own_template(loaded: tuple[Any, Any, Any]) -> None:
    family, _model, processor = loaded
    ours = family.render_chat(processor, chat(TWO_TURNS, 2))
    assert ours == processor.apply_chat_template(TWO_TURNS_HF, add_generation_prompt=True)
    assert "A cat." in ours and "Answer in one word." in ours and ours.index("What is this?") < ours.index("A cat.")
    # A prompt request is the one-turn chat [image, prompt].
    single = chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], 1)
    assert family.render_prompt(processor, "What?") == family.render_chat(processor, single)


def test_llava_next_falls_back_to_its_checkpoints_template() -> None:
    """A llava_next checkpoint without a chat template renders as llava-v1.6-mistral's (the tiny one ships it)."""
    family, _model, processor = load_tiny("llava_next")
    bare = type(processor).__new__(type(processor))
    bare.__dict__.update(processor.__dict__, chat_template=None)
    ours = family.render_chat(bare, chat(TWO_TURNS, 2))
    assert ours == family.render_chat(processor, chat(TWO_TURNS, 2))
    assert ours == ("<<SYS>>\nAnswer in one word.\n<</SYS>>\n\n[INST] <image>\nWhat is this? [/INST] A cat.</s> "
                    "[INST] <image>\nAnd this one? [/INST]")


def test_llava_onevision_renders_llava_hfs_template_without_one_of_its_own() -> None:
    """llava-hf's OneVision template: the role and a space, a message's images first, each text part after a newline,
    "<|im_end|>" with no newline after it; a checkpoint without a template gets the same."""
    family, _model, processor = load_tiny("llava_onevision")
    bare = type(processor).__new__(type(processor))
    bare.__dict__.update(processor.__dict__, chat_template=None)
    ours = family.render_chat(bare, chat(TWO_TURNS, 2))
    assert ours == family.render_chat(processor, chat(TWO_TURNS, 2))
    assert ours == ("<|im_start|>system \nAnswer in one word.<|im_end|><|im_start|>user <image>\nWhat is this?<|im_end|>"
                    "<|im_start|>assistant \nA cat.<|im_end|><|im_start|>user <image>\nAnd this one?<|im_end|>"
                    "<|im_start|>assistant\n")


def test_reserved_tokens_are_refused_in_any_turn(loaded: tuple[Any, Any, Any]) -> None:
    family, _model, processor = loaded
    token = processor.image_token
    with pytest.raises(InvalidInputError) as info:
        family.validate_prompt(f"x{token}y", "messages") if family.reserved_prompt_tokens else family.render_input(
            processor, chat([{"role": "assistant", "content": f"x{token}"}, {"role": "user", "content": "Hi"}]))
    assert info.value.param == "messages"


def test_text_only_and_two_images_match_transformers_the_batched_loop_and_the_engine(
        loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    items: list[tuple[Any, Any, SamplingParams]] = [
        ([], chat(TEXT_ONLY), SamplingParams(max_tokens=8)),
        (IMAGES, chat(TWO_TURNS, 2), SamplingParams(max_tokens=6)),
        ([IMAGES[1]], "What is this?", SamplingParams(max_tokens=7)),
        ([], chat(TEXT_ONLY[:1] + [{"role": "assistant", "content": "Once"}, {"role": "user", "content": "Go on."}]),
         SamplingParams(max_tokens=5)),
    ]
    images, prompts, params = [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
    # transformers' own generate, on the processor's own outputs (text-only rows: text alone).
    expected = [hf_generate(loaded, images[i], chat(TWO_TURNS, 2) if i == 1 else prompts[i], params[i].max_tokens)
                for i in (0, 1, 3)]
    batched = generate_batch(family, model, processor, images, prompts, params, [None] * len(items))
    alone = [generate_batch(family, model, processor, [i], [p], [s], [None])[0] for i, p, s in items]
    assert [list(o.token_ids) for o in batched] == [list(o.token_ids) for o in alone]
    assert [list(batched[i].token_ids) for i in (0, 1, 3)] == expected
    assert all(o.token_ids for o in batched)  # answers to compare, not empty ones
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024))
    assert engine.generate(items) == [list(o.token_ids) for o in batched]


def test_engine_prepares_no_pixels_for_a_text_only_turn_and_both_images_for_two(
        loaded: tuple[Any, Any, Any]) -> None:
    family, model, processor = loaded
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024))
    bare = engine.prepare([], chat(TEXT_ONLY), SamplingParams(max_tokens=1), lambda out: None)
    assert bare.mm_inputs["image_rows"] == [] and "pixel_values" not in bare.mm_inputs
    two = engine.prepare(IMAGES, chat(TWO_TURNS, 2), SamplingParams(max_tokens=1), lambda out: None)
    one = [engine.prepare([image], "What?", SamplingParams(max_tokens=1), lambda out: None) for image in IMAGES]
    if family.name == "llava_onevision":  # of several images, each is its whole view: one tile and a newline
        assert len(two.mm_inputs["image_rows"]) == 2 * (processor.num_image_tokens + 1)
        assert all(len(r.mm_inputs["image_rows"]) > processor.num_image_tokens + 1 for r in one)  # anyres alone
    else:
        assert len(two.mm_inputs["image_rows"]) == sum(len(r.mm_inputs["image_rows"]) for r in one) > 0


def test_qwen2_vl_positions_of_a_text_only_turn_are_plain_and_two_images_are_the_models_own() -> None:
    family, model, processor = load_tiny("qwen2_vl")
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024))
    bare = engine.prepare([], chat(TEXT_ONLY), SamplingParams(max_tokens=1), lambda out: None)
    length = len(bare.prompt_ids)
    assert bare.prompt_positions is not None
    assert torch.equal(bare.prompt_positions, torch.arange(length).expand(3, length)) and bare.rope_delta == 0
    two = engine.prepare(IMAGES, chat(TWO_TURNS, 2), SamplingParams(max_tokens=1), lambda out: None)
    inputs = processor(images=[IMAGES], text=[family.render_chat(processor, chat(TWO_TURNS, 2))], return_tensors="pt")
    positions, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"],
                                                   attention_mask=inputs["attention_mask"])
    assert inputs["image_grid_thw"].shape[0] == 2
    assert two.prompt_positions is not None
    assert torch.equal(two.prompt_positions, positions[:, 0]) and two.rope_delta == int(deltas.flatten()[0]) != 0
