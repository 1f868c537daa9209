"""triton_vlm.engine with the tiny Idefics3 (smolvlm) on CPU: the same tokens as transformers' own ``generate``,
alone and batched with images split into different numbers of tiles, chunked prefill included; the tiles' features
land in their ``<image>`` rows exactly where the model's own merge puts them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from triton_vlm.engine.request import EngineRequest
from triton_vlm.errors import GenerationError
from triton_vlm.models.smolvlm.family import SmolVLMFamily
from triton_vlm.sampling import SamplingParams

from .helpers import ParityCase, noise, parity_fixtures

PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi",
           "two people riding bicycles"]
#: Resized to 64 px on the longest edge, then 32 px tiles: 2x2 + the global view (5 tiles), 1x2 + 1 (3 tiles).
SIZES = [(40, 30), (17, 90), (64, 64), (100, 20)]
TILES = [5, 3, 5, 3]
MAX_TOKENS = [10, 7, 14, 12]
TOKENS_PER_TILE = 4  # (32 / 8)^2 patches, pixel shuffle by 2

CASE = ParityCase("smolvlm", PROMPTS, SIZES, MAX_TOKENS)
IMAGES = CASE.images
engine = CASE.engine
loaded, _batched_loop = parity_fixtures(CASE)


def hf_generate(loaded: tuple[Any, Any, Any], index: int) -> list[int]:
    """transformers' greedy ``generate`` for request ``index`` alone, up to (not including) the EOS."""
    family, model, processor = loaded
    inputs = processor(images=[IMAGES[index]], text=[family.render_prompt(processor, PROMPTS[index])],
                       return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS[index])
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = family.stop_token_ids(model, processor)
    return next((new[:i] for i, token in enumerate(new) if token in stops), new)


@pytest.fixture(scope="module")
def reference(loaded: tuple[Any, Any, Any]) -> list[list[int]]:
    return [hf_generate(loaded, i) for i in range(len(PROMPTS))]


def requests(loaded: tuple[Any, Any, Any], indices: list[int]) -> list[EngineRequest]:
    smol = engine(loaded)
    return [smol.prepare(IMAGES[i], PROMPTS[i], SamplingParams(max_tokens=4), lambda out: None) for i in indices]


def test_reference_is_worth_matching(reference: list[list[int]]) -> None:
    """The tiny weights answer differently per image and prompt (a model that always says the same token would
    let a wrong image row or position pass)."""
    assert sum(len(tokens) for tokens in reference) > 30
    assert len({tuple(tokens) for tokens in reference}) == len(reference)


def test_the_family_runs_on_the_engine(loaded: tuple[Any, Any, Any]) -> None:
    family, model, _ = loaded
    assert isinstance(family, SmolVLMFamily) and family.has_engine
    assert family.architectures == ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    smol = engine(loaded)
    # The SmolLM2-style text model: tied embeddings and SmolVLM's rope theta, read from the model's own modules.
    assert model.config.text_config.rope_parameters["rope_theta"] == 273768.0
    assert smol.decoder.lm_weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()
    assert smol.adapter.image_shape(model) == (3, 32, 32)


def test_images_are_split_into_tiles(loaded: tuple[Any, Any, Any]) -> None:
    for request, tiles in zip(requests(loaded, [0, 1, 2, 3]), TILES, strict=True):
        rows = request.mm_inputs["image_rows"]
        assert tuple(request.mm_inputs["pixel_values"].shape) == (tiles, 3, 32, 32)
        assert len(rows) == tiles * TOKENS_PER_TILE
        # One run of <image> rows per tile, between the tile's tag and <fake_token_around_image>.
        runs = [rows[i:i + TOKENS_PER_TILE] for i in range(0, len(rows), TOKENS_PER_TILE)]
        assert all(run == list(range(run[0], run[0] + TOKENS_PER_TILE)) for run in runs)
        assert all(b[0] - a[-1] > 1 for a, b in zip(runs, runs[1:], strict=False))


def test_prompt_embeds_equal_the_models_own_merge(loaded: tuple[Any, Any, Any]) -> None:
    """Each request's embeddings (a batch of a 5-tile and a 3-tile image) are what Idefics3Model.inputs_merger
    builds from the model's own get_image_features: every tile's features in its own rows, in order."""
    family, model, processor = loaded
    smol = engine(loaded)
    batch = requests(loaded, [0, 1])
    embeds = smol.adapter.prompt_embeds(model, smol.decoder, batch, smol.runner.encode_images)
    for index, (request, ours) in enumerate(zip(batch, embeds, strict=True)):
        inputs = processor(images=[IMAGES[index]], text=[family.render_prompt(processor, PROMPTS[index])],
                           return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == request.prompt_ids
        with torch.inference_mode():
            features = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
            text = model.get_input_embeddings()(inputs["input_ids"])
            theirs = model.model.inputs_merger(inputs["input_ids"], text, torch.cat(list(features)))[0]
        torch.testing.assert_close(ours, theirs)
    # Another image changes the image rows and nothing else.
    other = smol.prepare(noise(40, 30, seed=99), PROMPTS[0], SamplingParams(max_tokens=4), lambda out: None)
    (changed,) = smol.adapter.prompt_embeds(model, smol.decoder, [other], smol.runner.encode_images)
    rows = batch[0].mm_inputs["image_rows"]
    text_rows = [i for i in range(len(other.prompt_ids)) if i not in set(rows)]
    assert not torch.allclose(changed[rows], embeds[0][rows])
    assert torch.equal(changed[text_rows], embeds[0][text_rows])


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_engine_alone_matches_transformers_generate(loaded: tuple[Any, Any, Any], reference: list[list[int]],
                                                    index: int) -> None:
    smol = engine(loaded)
    assert smol.generate([CASE.items()[index]]) == [reference[index]]


def test_engine_batched_matches_transformers_generate(loaded: tuple[Any, Any, Any],
                                                      reference: list[list[int]]) -> None:
    """Four requests of 3 and 5 tiles (prompts of different lengths, image rows at different positions) in one
    engine run, two at a time, so requests join while others decode."""
    smol = engine(loaded, max_num_seqs=2)
    assert smol.generate(CASE.items()) == reference
    assert smol.cache.free_slots == smol.cache.num_slots


def test_chunks_that_split_the_tiles_change_nothing(loaded: tuple[Any, Any, Any], reference: list[list[int]],
                                                    _batched_loop: list[list[int]]) -> None:
    smol = engine(loaded, max_num_seqs=4, max_prefill_tokens=16)  # prompts of 30 to 50 positions
    splits: list[bool] = []
    schedule = smol.scheduler.schedule

    def recording() -> Any:
        plan = schedule()
        for chunk in plan.prefill:  # does the chunk start inside a tile's run of <image> rows?
            rows = set(chunk.seq.request.mm_inputs["image_rows"])
            splits.append(chunk.start in rows and chunk.start - 1 in rows)
        return plan

    smol.scheduler.schedule = recording  # type: ignore[method-assign]
    assert smol.generate(CASE.items()) == reference == _batched_loop
    assert any(splits)


def test_padded_tiles_are_refused(loaded: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    family, _, processor = loaded
    smol = engine(loaded)
    call = type(processor).__call__

    def padded(self: Any, *args: Any, **kwargs: Any) -> Any:
        encoded = call(self, *args, **kwargs)
        encoded["pixel_attention_mask"][..., -1] = 0
        return encoded

    monkeypatch.setattr(type(processor), "__call__", padded)
    with pytest.raises(GenerationError, match="padded an image's tiles"):
        smol.adapter.prepare(family, processor, [IMAGES[0]], family.render_input(processor, PROMPTS[0]))
