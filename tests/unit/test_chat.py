"""Chat requests (issue 24): the ``messages`` JSON (triton_vlm.chat), each family's rendering of a conversation
(against the processor's own ``apply_chat_template``), image limits, and text-only / multi-image rows through the
batched loop and the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from triton_vlm.chat import Chat, ImagePart, Message, parse_messages
from triton_vlm.direct import direct_runtime
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.base import transcript
from triton_vlm.models.generation import GenerationOutput, generate_batch
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams

from .helpers import image_bytes, load_tiny, noise

#: A 4-turn chat about two images: system, a question about the first image, the answer, a follow-up showing a
#: second image (after the text), its answer, and the last question.
FOUR_TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
    {"role": "user", "content": "Which is bigger?"},
]
#: The same conversation as transformers' apply_chat_template takes it, written by hand.
FOUR_TURNS_HF = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
    {"role": "user", "content": [{"type": "text", "text": "Which is bigger?"}]},
]
IMAGES = [noise(40, 30, 1), noise(30, 50, 2)]


def chat(messages: list[dict[str, Any]], images: int = 0) -> Chat:
    return parse_messages(json.dumps(messages), images)


# -- the messages input ---------------------------------------------------------------------------------------------
def test_messages_parse_into_turns_with_images_where_they_stood() -> None:
    parsed = chat(FOUR_TURNS, 2)
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert parsed.messages[1].parts == (ImagePart(0), "What is this?")
    assert parsed.messages[3].parts == ("And this one?", ImagePart(1))
    assert parsed.image_count == 2 and parsed.question == "Which is bigger?"
    assert parsed.hf_messages() == FOUR_TURNS_HF
    developer = chat([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert developer.messages[0] == Message("system", ("Be brief.",))


@pytest.mark.parametrize("raw, images, param, fragment", [
    ("not json", 0, "messages", "not valid JSON"),
    ("{}", 0, "messages", "non-empty JSON list"),
    ("[]", 0, "messages", "non-empty JSON list"),
    ('["hi"]', 0, "messages", "messages[0]: expected an object"),
    ('[{"role": "tool", "content": "x"}]', 0, "messages", "messages[0].role: expected one of"),
    ('[{"role": "user", "content": 3}]', 0, "messages", "messages[0].content: expected a string or a list"),
    ('[{"role": "user", "content": [{"type": "image_url"}]}]', 0, "messages", "messages[0].content[0]"),
    ('[{"role": "user", "content": [{"type": "text"}]}]', 0, "messages", "messages[0].content[0]"),
    ('[{"role": "assistant", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}]', 1, "messages",
     "images belong to user messages"),
    ('[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]', 0, "messages",
     "the last message must be the user's"),
    ('[{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]', 1, "images", "2 image part(s)"),
    ('[{"role": "user", "content": "x"}]', 1, "images", "0 image part(s)"),
])
def test_bad_messages_name_the_field(raw: str, images: int, param: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_messages(raw, images)
    assert info.value.param == param and fragment in str(info.value) and str(info.value).startswith(f"{param}: ")


# -- each family's format -------------------------------------------------------------------------------------------
def test_llava_renders_a_chat_with_the_processors_own_template(llava_runtime: VLMRuntime) -> None:
    loaded = llava_runtime.ensure_loaded()
    ours = loaded.family.render_chat(loaded.processor, chat(FOUR_TURNS, 2))
    assert ours == loaded.processor.apply_chat_template(FOUR_TURNS_HF, add_generation_prompt=True)
    # llava-hf's LLaVA-1.5 format: system text first, a message's images before its text, the generation prompt last.
    assert ours == ("Answer in one word. USER: <image>\nWhat is this? ASSISTANT: A cat. USER: <image>\nAnd this one? "
                    "ASSISTANT: A dog. USER: Which is bigger? ASSISTANT:")
    # A prompt request is the one-turn chat [image, prompt]: the same input either way.
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert loaded.family.render_prompt(loaded.processor, "What is this?") == loaded.family.render_chat(
        loaded.processor, chat(single, 1)) == "USER: <image>\nWhat is this? ASSISTANT:"


def test_auto_renders_a_chat_with_the_checkpoints_template(auto_runtime: VLMRuntime) -> None:
    loaded = auto_runtime.ensure_loaded()
    ours = loaded.family.render_chat(loaded.processor, chat(FOUR_TURNS, 2))
    assert ours == loaded.processor.apply_chat_template(FOUR_TURNS_HF, add_generation_prompt=True)
    assert ours.count("<image>") == 2 and ours.endswith("User: Which is bigger?<end_of_utterance>\nAssistant:")
    with pytest.raises(InvalidInputError) as info:  # the checkpoint's control tokens, in any turn
        loaded.family.render_input(loaded.processor, chat([{"role": "assistant", "content": "x<end_of_utterance>"},
                                                           {"role": "user", "content": "Hi"}]))
    assert info.value.param == "messages"


def test_kosmos2_without_a_chat_format_gets_the_transcript(kosmos2_runtime: VLMRuntime) -> None:
    loaded = kosmos2_runtime.ensure_loaded()
    conversation = chat([FOUR_TURNS[0], *FOUR_TURNS[1:3], {"role": "user", "content": "And its colour?"}], 1)
    assert loaded.family.render_chat(loaded.processor, conversation) == (
        "Answer in one word.\n\nUser: What is this?\nAssistant: A cat.\nUser: And its colour?")
    # One user turn is its text as it is: what the prompt form sends (grounding prompts included).
    grounding = chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<grounding>An"}]}], 1)
    assert loaded.family.render_chat(loaded.processor, grounding) == "<grounding>An" == transcript(grounding)


def test_moondream2_chat_is_its_question_answer_template() -> None:
    family, _model, processor = load_tiny("moondream2")
    conversation = chat([FOUR_TURNS[0], *FOUR_TURNS[1:3], {"role": "user", "content": "And its colour?"}], 1)
    query = processor.tokens.templates["query"]
    expected = (processor.prompt_tokens(_query(), "Answer in one word.\n\nWhat is this?")
                + processor.tokenizer.encode(processor.generation.question_prefix + "A cat.")
                + processor.prompt_tokens(_query(), "And its colour?"))
    assert family.render_chat(processor, conversation) == expected
    assert expected[-len(query["suffix"]):] == list(query["suffix"])  # ends asking for the answer
    single = chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], 1)
    assert family.render_chat(processor, single) == family.render_prompt(processor, "What is it?")


def test_moondream2_skills_take_a_chats_last_question() -> None:
    family, _model, processor = load_tiny("moondream2")
    conversation = chat([*FOUR_TURNS[1:3], {"role": "user", "content": "the cat"}], 1)
    assert family.render_input(processor, conversation, "detect") == family.render_request(processor, "the cat",
                                                                                          "detect")
    assert family.render_input(processor, conversation, "caption:short") == family.render_request(
        processor, "", "caption:short")
    assert family.render_input(processor, conversation, "query") == family.render_chat(processor, conversation)


def _query() -> Any:
    from triton_vlm.models.moondream2.tasks import Task

    return Task("query")


# -- limits ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unloaded() -> dict[str, VLMRuntime]:
    """Runtimes that validate requests without weights (make_chat_request loads nothing)."""
    return {name: direct_runtime(name, tiny=True, device="cpu") for name in ("llava", "kosmos2", "moondream2")}


def two_images() -> str:
    return json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                    {"type": "text", "text": "Same?"}]}])


@pytest.mark.parametrize("model, images, fragment", [
    ("moondream2", 2, "model family 'moondream2' takes at most 1 per request"),
    ("kosmos2", 2, "model family 'kosmos2' takes at most 1 per request"),
    ("llava", 9, "model family 'llava' takes at most 8 per request"),
    ("moondream2", 0, "model family 'moondream2' needs 1 per request"),
])
def test_image_limits_are_the_familys_and_name_images(unloaded: dict[str, VLMRuntime], model: str, images: int,
                                                     fragment: str) -> None:
    messages = json.dumps([{"role": "user", "content": [*[{"type": "image"}] * images,
                                                        {"type": "text", "text": "Hi"}]}])
    with pytest.raises(InvalidInputError) as info:
        # Not images at all: the count is refused before anything is decoded.
        unloaded[model].make_chat_request(messages, [b"never decoded"] * images)
    assert info.value.param == "images" and fragment in str(info.value)


def test_chat_requests_are_checked_like_prompts(unloaded: dict[str, VLMRuntime]) -> None:
    llava = unloaded["llava"]
    request = llava.make_chat_request(two_images(), [image_bytes(20, 10, 1), image_bytes(10, 20, 2)], max_tokens=3)
    assert [im.size for im in request.images] == [(20, 10), (10, 20)] and request.params.max_tokens == 3
    assert request.prompt_text == "Same?" and request.image is request.images[0]
    text_only = llava.make_chat_request('[{"role": "user", "content": "Hi"}]')
    assert text_only.images == () and text_only.image is None
    cases = [
        (lambda: llava.make_chat_request('[{"role": "user", "content": "an <image> inside"}]'), "messages",
         "reserved token"),
        (lambda: llava.make_chat_request('[{"role": "user", "content": "x\\u0000"}]'), "messages", "NUL"),
        (lambda: llava.make_chat_request(json.dumps([{"role": "user", "content": "x" * 16_001}])), "messages",
         "over the limit"),
        (lambda: llava.make_chat_request('[{"role": "user", "content": " "}]'), "messages", "no text and no image"),
        (lambda: llava.make_chat_request(two_images(), [image_bytes(8, 8), b"junk"]), "images",
         "images[1]: not a recognised image"),
        (lambda: llava.make_chat_request('[{"role": "user", "content": "Hi"}]', task="query"), "task", "takes no task"),
        (lambda: unloaded["moondream2"].make_chat_request(
            '[{"role": "user", "content": [{"type": "image"}]}]', [image_bytes(8, 8)], task="detect"), "messages",
         "task 'detect' needs a question"),
        (lambda: llava.make_chat_request('[{"role": "user", "content": "Hi"}]', max_tokens=0), "max_tokens", "in [1,"),
    ]
    for make, param, fragment in cases:
        with pytest.raises(InvalidInputError) as info:
            make()
        assert info.value.param == param and fragment in str(info.value), (param, fragment)


# -- the batched loop -----------------------------------------------------------------------------------------------
def _alone(runtime: VLMRuntime, request: Any) -> GenerationOutput:
    (output,) = runtime.generate([request])
    assert isinstance(output, GenerationOutput), output
    return output


def test_text_only_and_several_images_in_one_llava_batch(llava_runtime: VLMRuntime) -> None:
    images = [image_bytes(40, 30, 1), image_bytes(30, 50, 2)]
    requests = [
        llava_runtime.make_chat_request('[{"role": "user", "content": "Say something."}]', max_tokens=6),
        llava_runtime.make_chat_request(json.dumps(FOUR_TURNS), images, max_tokens=5),
        llava_runtime.make_request(images[0], "What is this?", max_tokens=4),
    ]
    batch = llava_runtime.generate(requests)
    assert batch == [_alone(llava_runtime, r) for r in requests]  # rows of every kind batch like singles
    text_only, two, one = batch
    assert isinstance(text_only, GenerationOutput) and isinstance(two, GenerationOutput)
    assert isinstance(one, GenerationOutput)
    loaded = llava_runtime.ensure_loaded()
    tokens = loaded.processor.tokenizer
    rendered = loaded.family.render_chat(loaded.processor, requests[1].prompt)
    per_image = 25  # the tiny CLIP's 5x5 patches ("default" strategy: no CLS row); one placeholder each
    assert two.prompt_tokens == len(tokens(rendered)["input_ids"]) + 2 * (per_image - 1)
    assert text_only.prompt_tokens == len(tokens("USER: Say something. ASSISTANT:")["input_ids"])


def test_kosmos2_answers_text_only_rows_beside_image_rows(kosmos2_runtime: VLMRuntime) -> None:
    requests = [kosmos2_runtime.make_chat_request('[{"role": "user", "content": "An apple is"}]', max_tokens=6),
                kosmos2_runtime.make_request(image_bytes(40, 30, 1), "<grounding>An image of", max_tokens=6)]
    text_only, grounded = kosmos2_runtime.generate(requests)
    assert isinstance(text_only, GenerationOutput) and isinstance(grounded, GenerationOutput)
    assert [text_only, grounded] == [_alone(kosmos2_runtime, r) for r in requests]
    assert text_only.prompt_tokens < 10 < grounded.prompt_tokens  # no image latents in the text-only prompt
    # Boxes of a text-only answer are the model's own (0..1); there are no pixels to map them to.
    from triton_vlm.models.kosmos2.family import grounded_entities

    raw = "<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>"
    _text, (entity,) = grounded_entities(kosmos2_runtime.ensure_loaded().processor, raw, None)
    assert entity["phrase"] == "a dog" and len(entity["boxes"]) == 1 and entity["boxes_px"] == []


# -- the engine -----------------------------------------------------------------------------------------------------
def test_engine_mixes_text_only_multi_image_and_prompt_requests(llava_runtime: VLMRuntime) -> None:
    """The engine's vision step leaves text-only requests out and gives a two-image request both images' rows: the
    same tokens as the batched loop, requests of the three kinds admitted in one step."""
    loaded = llava_runtime.ensure_loaded()
    text_only = chat([{"role": "user", "content": "Say something."}])
    two = chat(FOUR_TURNS, 2)
    items: list[tuple[Any, Any, SamplingParams]] = [
        ([], text_only, SamplingParams(max_tokens=8)), (IMAGES, two, SamplingParams(max_tokens=6)),
        (IMAGES[1], "What is this?", SamplingParams(max_tokens=7)), ([], text_only, SamplingParams(max_tokens=3))]
    reference = generate_batch(loaded.family, loaded.model, loaded.processor, [i[0] for i in items],
                               [i[1] for i in items], [i[2] for i in items])
    engine = LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(max_model_len=256))
    prepared = engine.prepare(IMAGES, two, SamplingParams(max_tokens=1), lambda out: None)
    assert len(prepared.mm_inputs["image_rows"]) == 2 * 25 and prepared.mm_inputs["pixel_values"].shape[0] == 2
    bare = engine.prepare([], text_only, SamplingParams(max_tokens=1), lambda out: None)
    assert bare.mm_inputs == {"image_rows": []}
    assert engine.generate(items) == [list(o.token_ids) for o in reference]


def test_kosmos2_engine_answers_a_text_only_turn(kosmos2_runtime: VLMRuntime) -> None:
    loaded = kosmos2_runtime.ensure_loaded()
    items: list[tuple[Any, Any, SamplingParams]] = [
        ([], chat([{"role": "user", "content": "An apple is"}]), SamplingParams(max_tokens=6)),
        (IMAGES[0], "<grounding>An image of", SamplingParams(max_tokens=6))]
    reference = loaded.family.generate(loaded.model, loaded.processor, [i[0] for i in items], [i[1] for i in items],
                                       [i[2] for i in items], [None, None])
    engine = LLMEngine(loaded.family, loaded.model, loaded.processor, EngineConfig(max_model_len=256))
    assert engine.generate(items) == [list(o.token_ids) for o in reference]

