"""kosmos2 grounding: entities from location tokens, their pixel boxes, the optional ``entities`` output, the
client's typed entities and drawing, and ``triton-vlm infer --draw``."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from triton_vlm.cli.main import main
from triton_vlm.client.entities import Box, Entity, draw_entities, entities_from_answer, parse_entities
from triton_vlm.errors import InvalidInputError
from triton_vlm.models.generation import GenerationOutput, generate_batch
from triton_vlm.models.kosmos2 import grounded_entities, visible_region
from triton_vlm.runtime import VLMRuntime
from triton_vlm.sampling import SamplingParams

from .helpers import ROOT, SAMPLE_IMAGE, image_bytes
from .test_backend import backend, request  # noqa: F401 - the fake-Triton backend fixture

# transformers' own example (Kosmos2Processor.post_process_generation), as a generated answer: the prompt
# "<grounding> An image of" is not part of it.
SNOWMAN = ("<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
           "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.")
SNOWMAN_TEXT = "a snowman warming himself by a fire."
SNOWMAN_BOX = {"x_min": 0.390625, "y_min": 0.046875, "x_max": 0.984375, "y_max": 0.828125}
FIRE_BOX = {"x_min": 0.171875, "y_min": 0.015625, "x_max": 0.484375, "y_max": 0.890625}


def whole_image_processor(processor: Any) -> Any:
    """The processor as Kosmos-2's real one: images resized to 224x224 as a whole (no crop)."""
    image_processor = SimpleNamespace(size={"height": 224, "width": 224}, crop_size={"height": 224, "width": 224},
                                      do_center_crop=False)
    return SimpleNamespace(post_process_generation=processor.post_process_generation,
                           image_processor=image_processor)


# -- parsing -----------------------------------------------------------------------------------------------------
def test_crafted_answer_gives_exact_entities(kosmos2_runtime: VLMRuntime) -> None:
    processor = whole_image_processor(kosmos2_runtime.ensure_loaded().processor)
    text, entities = grounded_entities(processor, SNOWMAN, (640, 480))
    assert text == SNOWMAN_TEXT
    assert [e["phrase"] for e in entities] == ["a snowman", "a fire"]
    assert [e["span"] for e in entities] == [[0, 9], [29, 35]]
    assert all(text[e["span"][0]:e["span"][1]] == e["phrase"] for e in entities)
    assert [e["boxes"] for e in entities] == [[SNOWMAN_BOX], [FIRE_BOX]]
    # Pixels of the non-square original: x by 640, y by 480.
    assert entities[0]["boxes_px"] == [{"x_min": 250.0, "y_min": 22.5, "x_max": 630.0, "y_max": 397.5}]
    assert entities[1]["boxes_px"] == [{"x_min": 110.0, "y_min": 7.5, "x_max": 310.0, "y_max": 427.5}]


def test_pixel_boxes_follow_the_original_size(kosmos2_runtime: VLMRuntime) -> None:
    processor = whole_image_processor(kosmos2_runtime.ensure_loaded().processor)
    _, tall = grounded_entities(processor, SNOWMAN, (300, 900))
    assert tall[0]["boxes"] == [SNOWMAN_BOX]  # normalized boxes do not depend on the image
    assert tall[0]["boxes_px"] == [{"x_min": 117.19, "y_min": 42.19, "x_max": 295.31, "y_max": 745.31}]


def test_pixel_boxes_go_through_a_centre_crop(kosmos2_runtime: VLMRuntime) -> None:
    # The tiny processor resizes the shortest edge to 30 and crops the centre 30x30, as CLIP's does: the model
    # sees the middle 480x480 of a 640x480 image, so its boxes are in that square.
    processor = kosmos2_runtime.ensure_loaded().processor
    assert visible_region(processor.image_processor, 640, 480) == (80.0, 0.0, 480.0, 480.0)
    assert visible_region(processor.image_processor, 300, 600) == (0.0, 150.0, 300.0, 300.0)
    assert visible_region(whole_image_processor(processor).image_processor, 640, 480) == (0.0, 0.0, 640.0, 480.0)
    _, entities = grounded_entities(processor, SNOWMAN, (640, 480))
    assert entities[0]["boxes"] == [SNOWMAN_BOX]
    assert entities[0]["boxes_px"] == [{"x_min": 267.5, "y_min": 22.5, "x_max": 552.5, "y_max": 397.5}]


def test_several_boxes_for_one_phrase(kosmos2_runtime: VLMRuntime) -> None:
    processor = whole_image_processor(kosmos2_runtime.ensure_loaded().processor)
    raw = ("<phrase> two dogs</phrase><object><patch_index_0000><patch_index_0033></delimiter_of_multi_objects/>"
           "<patch_index_0990><patch_index_1023></object> play")
    text, (dogs,) = grounded_entities(processor, raw, (64, 32))
    assert text == "two dogs play" and dogs["span"] == [0, 8]
    # 0..33 on a 32x32 grid: cells (0,0)..(1,1), corners at cell centres; 990..1023: (30,30)..(31,31).
    assert dogs["boxes"] == [{"x_min": 1 / 64, "y_min": 1 / 64, "x_max": 3 / 64, "y_max": 3 / 64},
                             {"x_min": 61 / 64, "y_min": 61 / 64, "x_max": 63 / 64, "y_max": 63 / 64}]
    assert dogs["boxes_px"][1] == {"x_min": 61.0, "y_min": 30.5, "x_max": 63.0, "y_max": 31.5}


def test_object_without_phrase_takes_the_prompts_phrase(kosmos2_runtime: VLMRuntime) -> None:
    processor = whole_image_processor(kosmos2_runtime.ensure_loaded().processor)
    raw = "<object><patch_index_0044><patch_index_0863></object> is warming himself"
    text, (entity,) = grounded_entities(processor, raw, (640, 480), "<grounding><phrase> a snowman</phrase>")
    assert text == "is warming himself"
    assert entity["phrase"] == "a snowman" and entity["span"] == [0, 0]  # zero width, inside the text
    assert entity["boxes"] == [SNOWMAN_BOX]
    _, (anonymous,) = grounded_entities(processor, raw, (640, 480), "<grounding> Where?")
    assert anonymous["phrase"] == ""


def test_answer_without_tags_has_no_entities(kosmos2_runtime: VLMRuntime) -> None:
    processor = kosmos2_runtime.ensure_loaded().processor
    assert grounded_entities(processor, " just words.", (10, 10)) == ("just words.", [])


def test_decode_output_cleans_the_text_and_adds_entities(kosmos2_runtime: VLMRuntime) -> None:
    loaded = kosmos2_runtime.ensure_loaded()
    family, processor = loaded.family, loaded.processor
    ids = processor.tokenizer(SNOWMAN, add_special_tokens=False)["input_ids"]
    image = Image.new("RGB", (640, 480))
    text, extras = family.decode_output(processor, ids, image, "<grounding> An image of")
    assert text == family.decode_text(processor, ids)
    assert "<" not in text and text.startswith("a snowman warming himself by a fire")
    entities = json.loads(extras["entities"])
    assert [e["phrase"] for e in entities] == ["a snowman", "a fire"]
    assert [e["boxes"] for e in entities] == [[SNOWMAN_BOX], [FIRE_BOX]]
    assert all(text[e["span"][0]:e["span"][1]] == e["phrase"] for e in entities)
    assert family.extra_outputs == {"entities": "[]"}


def test_generation_outputs_carry_entities_for_kosmos2_only(kosmos2_runtime: VLMRuntime,
                                                            llava_runtime: VLMRuntime) -> None:
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    loaded = kosmos2_runtime.ensure_loaded()
    outs = generate_batch(loaded.family, loaded.model, loaded.processor, [image, image],
                          ["<grounding> An image of", "What is this?"], [SamplingParams(max_tokens=6)] * 2)
    for out in outs:
        assert set(out.extras) == {"entities"}
        assert isinstance(json.loads(out.extras["entities"]), list)
    loaded = llava_runtime.ensure_loaded()
    (out,) = generate_batch(loaded.family, loaded.model, loaded.processor, [image], ["What?"],
                            [SamplingParams(max_tokens=2)])
    assert out.extras == {}


# -- client objects ----------------------------------------------------------------------------------------------
def test_parse_entities_gives_typed_objects(kosmos2_runtime: VLMRuntime) -> None:
    processor = whole_image_processor(kosmos2_runtime.ensure_loaded().processor)
    _, entities = grounded_entities(processor, SNOWMAN, (640, 480))
    parsed = parse_entities(json.dumps(entities))
    assert parsed == parse_entities(json.dumps(entities).encode()) == parse_entities(entities)
    snowman = parsed[0]
    assert snowman == Entity(phrase="a snowman", span=(0, 9), boxes=[Box(0.390625, 0.046875, 0.984375, 0.828125)],
                             boxes_px=[Box(250.0, 22.5, 630.0, 397.5)])
    assert parse_entities("[]") == []


@pytest.mark.parametrize("bad", ["not json", "{}", '[{"span": [0, 1]}]', '[{"phrase": "x", "boxes": [{"x": 1}]}]'])
def test_parse_entities_rejects_malformed_data(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="entities"):
        parse_entities(bad)


def test_entities_from_moondream2_answers() -> None:
    detect = json.dumps({"objects": [{"x_min": 10, "y_min": 20, "x_max": 30, "y_max": 60}],
                         "image_size": {"width": 100, "height": 200}})
    (house,) = entities_from_answer(detect, "house")
    assert house == Entity(phrase="house", span=None, boxes=[Box(0.1, 0.1, 0.3, 0.3)],
                           boxes_px=[Box(10, 20, 30, 60)])
    point = json.dumps({"points": [{"x": 50, "y": 100}], "image_size": {"width": 100, "height": 200}})
    (tree,) = entities_from_answer(point, "tree")
    assert tree.boxes_px == [Box(50, 100, 50, 100)] and tree.boxes_px[0].is_point
    assert tree.boxes == [Box(0.5, 0.5, 0.5, 0.5)]
    for text in ("a plain answer", '{"objects": []}', '["x"]', '{"other": 1}'):
        assert entities_from_answer(text) == []


# -- drawing -----------------------------------------------------------------------------------------------------
def test_draw_changes_pixels_on_the_box_only() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    entity = Entity(phrase="", span=(0, 0), boxes=[], boxes_px=[Box(40, 20, 160, 80)])
    drawn = draw_entities(image, [entity], width=3)
    assert drawn.size == image.size and drawn is not image
    assert np.asarray(image).min() == 255  # the original is untouched
    pixels = np.asarray(drawn).astype(int)
    assert (pixels[50, 40] != 255).any() and (pixels[20, 100] != 255).any()  # left and top edges
    assert (pixels[79, 100] != 255).any() and (pixels[50, 159] != 255).any()  # bottom and right edges
    assert (pixels[50, 100] == 255).all()  # inside the box
    assert (pixels[5, 5] == 255).all() and (pixels[95, 195] == 255).all()  # outside


def test_draw_labels_and_points() -> None:
    image = Image.new("L", (120, 120), 0)
    entities = [Entity(phrase="a dog", span=(0, 5), boxes_px=[Box(30, 60, 90, 110)]),
                Entity(phrase="", span=None, boxes_px=[Box(20, 20, 20, 20)])]
    drawn = draw_entities(image, entities)
    assert drawn.mode == "RGB"
    pixels = np.asarray(drawn)
    assert pixels[45:60, 30:90].any()  # the label sits above the box
    assert pixels[20, 20].any()  # the point's dot
    assert not pixels[100:110, 100:110].any()


# -- the backend's optional output -------------------------------------------------------------------------------
def initialize_with_outputs(backend: Any, family: str, outputs: list[str]) -> Any:  # noqa: F811
    class Model(backend.TritonVLMModel):
        pass

    Model.family = family
    model = Model()
    config = {"parameters": {"tiny": {"string_value": "true"}}, "output": [{"name": n} for n in outputs]}
    model.initialize({"model_config": json.dumps(config), "model_name": family, "model_instance_kind": "CPU",
                      "model_instance_device_id": "0"})
    return model


COMMON = ["generated_text", "generated_tokens", "prompt_tokens", "finish_reason", "token_logprobs", "choices", "index",
          "cached_tokens"]


def test_backend_sends_entities_in_every_response_of_a_model_that_declares_it(
        backend: Any, kosmos2_runtime: VLMRuntime) -> None:  # noqa: F811
    model = initialize_with_outputs(backend, "kosmos2", [*COMMON, "entities"])
    model.runtime._loaded = kosmos2_runtime.ensure_loaded()
    image = image_bytes(40, 30, seed=2)
    responses = model.execute([request(image, b"<grounding> An image of", max_tokens=4),
                               request(image, b"What is this?", max_tokens=4), request(b"junk", b"x")])
    for response, prompt in zip(responses[:2], ("<grounding> An image of", "What is this?"), strict=True):
        assert response.error is None
        assert set(response.tensors) == {*COMMON, "entities"}
        (expected,) = kosmos2_runtime.generate([kosmos2_runtime.make_request(image, prompt, max_tokens=4)])
        assert response.tensors["entities"][0, 0].decode() == expected.extras["entities"]  # type: ignore[union-attr]
        assert isinstance(json.loads(response.tensors["entities"][0, 0]), list)
    assert responses[2].error is not None and responses[2].tensors == {}


def test_backend_leaves_out_undeclared_extras(backend: Any, kosmos2_runtime: VLMRuntime,  # noqa: F811
                                             llava_runtime: VLMRuntime) -> None:
    image = image_bytes(40, 30, seed=2)
    plain = initialize_with_outputs(backend, "kosmos2", COMMON)  # a kosmos2 config without the output
    plain.runtime._loaded = kosmos2_runtime.ensure_loaded()
    llava = initialize_with_outputs(backend, "llava", [*COMMON, "entities"])  # llava has no such output
    llava.runtime._loaded = llava_runtime.ensure_loaded()
    for model in (plain, llava):
        (response,) = model.execute([request(image, b"What is this?", max_tokens=2)])
        assert set(response.tensors) == set(COMMON)


# -- triton-vlm infer --draw ---------------------------------------------------------------------------------------
@pytest.fixture
def in_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def changed_pixels(path: Any) -> int:
    original = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    return int((np.abs(drawn - original).sum(-1) > 30).sum())


def test_infer_draw_kosmos2_entities(in_project: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                     capsys: pytest.CaptureFixture[str], kosmos2_runtime: VLMRuntime) -> None:
    import triton_vlm.direct

    processor = kosmos2_runtime.ensure_loaded().processor
    with Image.open(SAMPLE_IMAGE) as image:  # the header only: nothing else would close the file
        size = image.size
    text, entities = grounded_entities(processor, SNOWMAN, size)
    answer = GenerationOutput(text=text, token_ids=(1,), prompt_tokens=3, finish_reason="stop",
                              extras={"entities": json.dumps(entities)})
    monkeypatch.setattr(triton_vlm.direct, "direct_infer", lambda *a, **k: answer)
    out = tmp_path / "drawn.png"
    code = main(["infer", "--direct", "--tiny", "--model", "kosmos2", "--image", str(SAMPLE_IMAGE),
                 "--prompt", "<grounding> An image of", "--draw", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == text + "\n"
    assert "drew 2 entities (2 boxes/points)" in captured.err
    assert changed_pixels(out) > 500


def test_infer_draw_moondream2_detect_answer(in_project: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import triton_vlm.direct

    detect = json.dumps({"objects": [{"x_min": 100.0, "y_min": 140.0, "x_max": 320.0, "y_max": 360.0}],
                         "image_size": {"width": 640, "height": 480}})
    answer = GenerationOutput(text=detect, token_ids=(), prompt_tokens=3, finish_reason="stop")
    monkeypatch.setattr(triton_vlm.direct, "direct_runtime", lambda *a, **k: None)
    monkeypatch.setattr(triton_vlm.direct, "direct_infer", lambda *a, **k: answer)
    out = tmp_path / "house.png"
    code = main(["infer", "--direct", "--tiny", "--model", "moondream2", "--task", "detect", "--image",
                 str(SAMPLE_IMAGE), "--prompt", "house", "--draw", str(out)])
    assert code == 0 and "drew 1 entity (1 boxes/points)" in capsys.readouterr().err
    assert changed_pixels(out) > 500


def test_infer_draw_without_entities_writes_the_image(in_project: None, tmp_path: Any,
                                                      capsys: pytest.CaptureFixture[str],
                                                      llava_runtime: VLMRuntime) -> None:
    out = tmp_path / "plain.png"
    code = main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(SAMPLE_IMAGE),
                 "--prompt", "What is this?", "--max-tokens", "2", "--draw", str(out)])
    assert code == 0 and "drew 0 entities" in capsys.readouterr().err
    assert changed_pixels(out) == 0


def test_infer_draw_to_an_unwritable_path_is_exit_1(in_project: None, tmp_path: Any,
                                                    capsys: pytest.CaptureFixture[str],
                                                    llava_runtime: VLMRuntime) -> None:
    code = main(["infer", "--direct", "--tiny", "--model", "llava", "--image", str(SAMPLE_IMAGE),
                 "--prompt", "What is this?", "--max-tokens", "1", "--draw", str(tmp_path / "no" / "dir.png")])
    assert code == 1 and "--draw: cannot write" in capsys.readouterr().err
