"""triton_vlm.models.generation: the batched decode loop against transformers' own generate; batch parity."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from triton_vlm.errors import RequestCancelledError
from triton_vlm.models import generation
from triton_vlm.models.generation import CANCELLED, GenerationOutput, generate_batch, position_ids_for
from triton_vlm.runtime import GenerationRequest, VLMRuntime
from triton_vlm.sampling import SamplingParams

from .helpers import SAMPLE_IMAGE, rgb_array

PROMPTS = ["What is this?", "a photo of a cat sitting on a red mat next to a window. Describe it in detail.", "hi"]
SIZES = [(40, 30), (64, 64), (17, 90)]


def images(sizes: list[tuple[int, int]] = SIZES) -> list[Image.Image]:
    return [Image.fromarray(rgb_array(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]


def run(runtime: VLMRuntime, imgs: list[Image.Image], prompts: list[str],
        params: list[SamplingParams]) -> list[GenerationOutput]:
    loaded = runtime.ensure_loaded()
    return generate_batch(loaded.family, loaded.model, loaded.processor, imgs, prompts, params)


def hf_greedy(runtime: VLMRuntime, image: Image.Image, prompt: str, max_new_tokens: int) -> list[int]:
    loaded = runtime.ensure_loaded()
    family, processor = loaded.family, loaded.processor
    inputs = family.encode(processor, [image], [family.render_prompt(processor, prompt)])
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = family.stop_token_ids(loaded.model, processor)
    for i, token in enumerate(new):  # transformers keeps the EOS token and pads after it; we stop before it
        if token in stops:
            return new[:i]
    return new


# -- position ids ----------------------------------------------------------------------------------------------
def test_position_ids_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    assert position_ids_for(mask, 0, 9).tolist() == [[9, 9, 0, 1, 2], [0, 1, 2, 3, 4], [9, 0, 1, 9, 2]]


def test_position_ids_with_offset_and_pad_position() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_for(mask, 2, 1).tolist() == [[1, 1, 2, 3], [2, 3, 4, 5]]


def test_left_padded_row_sees_the_positions_it_sees_alone() -> None:
    alone = position_ids_for(torch.ones(1, 3, dtype=torch.long), 2, 1)
    padded = position_ids_for(torch.tensor([[0, 0, 0, 1, 1, 1]]), 2, 1)
    assert padded[:, 3:].tolist() == alone.tolist()


# -- parity with transformers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_index", [0, 1])
def test_greedy_matches_transformers_generate(runtime: VLMRuntime, prompt_index: int) -> None:
    image, prompt = images()[prompt_index], PROMPTS[prompt_index]
    (ours,) = run(runtime, [image], [prompt], [SamplingParams(max_tokens=12)])
    expected = hf_greedy(runtime, image, prompt, 12)
    assert list(ours.token_ids) == expected
    assert ours.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert ours.text == runtime.ensure_loaded().family.decode_text(runtime.ensure_loaded().processor, expected)


def test_greedy_matches_transformers_on_the_sample_image(runtime: VLMRuntime) -> None:
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    (ours,) = run(runtime, [image], ["What is this?"], [SamplingParams(max_tokens=10)])
    assert list(ours.token_ids) == hf_greedy(runtime, image, "What is this?", 10)


def test_prompt_tokens_counts_the_rendered_prompt(runtime: VLMRuntime) -> None:
    loaded = runtime.ensure_loaded()
    image = images()[0]
    (out,) = run(runtime, [image], [PROMPTS[1]], [SamplingParams(max_tokens=1)])
    inputs = loaded.family.encode(loaded.processor, [image], [loaded.family.render_prompt(loaded.processor,
                                                                                          PROMPTS[1])])
    assert out.prompt_tokens == inputs["input_ids"].shape[1] > 10


# -- batch parity -----------------------------------------------------------------------------------------------
def test_batch_equals_single_requests(runtime: VLMRuntime) -> None:
    imgs = images()
    params = [SamplingParams(max_tokens=10)] * 3
    batch = run(runtime, imgs, PROMPTS, params)
    singles = [run(runtime, [i], [p], [q])[0] for i, p, q in zip(imgs, PROMPTS, params, strict=True)]
    assert len({s.prompt_tokens for s in singles}) == 3  # different prompt lengths, so the batch is padded
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]
    assert batch == singles  # text, prompt_tokens and finish_reason too


def test_batch_order_does_not_matter(runtime: VLMRuntime) -> None:
    imgs = images()
    params = [SamplingParams(max_tokens=6)] * 3
    forward = run(runtime, imgs, PROMPTS, params)
    backward = run(runtime, imgs[::-1], PROMPTS[::-1], params)
    assert forward == backward[::-1]


def test_same_prompt_different_images_can_differ_and_match_singles(runtime: VLMRuntime) -> None:
    imgs = [Image.new("RGB", (32, 32), (0, 0, 0)), Image.new("RGB", (32, 32), (255, 255, 255))]
    params = [SamplingParams(max_tokens=8)] * 2
    batch = run(runtime, imgs, ["What is this?"] * 2, params)
    singles = [run(runtime, [i], ["What is this?"], params[:1])[0] for i in imgs]
    assert batch == singles


def test_per_row_max_tokens(runtime: VLMRuntime) -> None:
    limits = [1, 4, 9]
    imgs = images()
    batch = run(runtime, imgs, PROMPTS, [SamplingParams(max_tokens=n) for n in limits])
    longest = run(runtime, imgs, PROMPTS, [SamplingParams(max_tokens=9)] * 3)
    for out, full, n in zip(batch, longest, limits, strict=True):
        assert out.finish_reason == "length"
        assert len(out.token_ids) == n
        assert out.token_ids == full.token_ids[:n]  # greedy: a shorter limit is a prefix


def test_seeded_sampled_row_in_batch_equals_alone(runtime: VLMRuntime) -> None:
    imgs = images()
    seeded = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, seed=2024)
    batch = run(runtime, imgs, PROMPTS, [SamplingParams(max_tokens=3), seeded,
                                         SamplingParams(max_tokens=10, temperature=1.0, seed=9)])
    (alone,) = run(runtime, imgs[1:2], PROMPTS[1:2], [seeded])
    assert batch[1] == alone
    (again,) = run(runtime, imgs[1:2], PROMPTS[1:2], [seeded])
    assert again == alone
    greedy = run(runtime, imgs[1:2], PROMPTS[1:2], [SamplingParams(max_tokens=10)])[0]
    other_seed = run(runtime, imgs[1:2], PROMPTS[1:2],
                     [SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, seed=2025)])[0]
    assert alone.token_ids != greedy.token_ids or alone.token_ids != other_seed.token_ids


def test_different_seeds_give_different_tokens(runtime: VLMRuntime) -> None:
    img = images()[:1]
    outs = {run(runtime, img, PROMPTS[:1], [SamplingParams(max_tokens=8, temperature=2.0, seed=s)])[0].token_ids
            for s in range(4)}
    assert len(outs) >= 3


# -- stopping on EOS ------------------------------------------------------------------------------------------
def test_eos_as_first_token_gives_empty_stop(runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = images()[:1]
    (plain,) = run(runtime, imgs, PROMPTS[:1], [SamplingParams(max_tokens=5)])
    first = plain.token_ids[0]
    family = runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: {first})
    (out,) = run(runtime, imgs, PROMPTS[:1], [SamplingParams(max_tokens=5)])
    assert out.finish_reason == "stop"
    assert out.token_ids == () and out.text == ""


def test_eos_mid_row_stops_only_that_row(llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    # llava: its tiny tokenizer is deterministic, so the greedy rows (and a usable "EOS" token) are too.
    runtime = llava_runtime
    imgs = images()
    params = [SamplingParams(max_tokens=10)] * 3
    plain = run(runtime, imgs, PROMPTS, params)
    # Pick a token of row 0 that appears in no other row and not before its own position.
    row = plain[0].token_ids
    candidates = [(i, t) for i, t in enumerate(row) if i > 0 and t not in row[:i]
                  and all(t not in other.token_ids for other in plain[1:])]
    if not candidates:
        pytest.fail(f"tiny model output has no distinct token to use as EOS: {[p.token_ids for p in plain]}")
    index, stop = candidates[0]
    family = runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: {stop})
    out = run(runtime, imgs, PROMPTS, params)
    assert out[0].finish_reason == "stop" and out[0].token_ids == row[:index]
    assert out[1:] == plain[1:]  # the other rows ran on, unaffected by row 0 stopping


def test_default_stop_tokens_are_the_eos(runtime: VLMRuntime) -> None:
    loaded = runtime.ensure_loaded()
    stops = loaded.family.stop_token_ids(loaded.model, loaded.processor)
    assert stops == {loaded.processor.tokenizer.eos_token_id}


# -- ignore_eos -------------------------------------------------------------------------------------------------
def test_ignore_eos_row_runs_to_max_tokens(runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = images()[:1]
    (plain,) = run(runtime, imgs, PROMPTS[:1], [SamplingParams(max_tokens=6)])
    assert len(plain.token_ids) == 6  # the tiny models never say EOS within 6 tokens
    first = plain.token_ids[0]
    family = runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: {first})
    stopping, ignoring = run(runtime, imgs * 2, PROMPTS[:1] * 2,
                             [SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, ignore_eos=True)])
    assert stopping.finish_reason == "stop" and stopping.token_ids == ()
    # The row that ignores EOS keeps the "EOS" token and everything after it: the unpatched greedy answer.
    assert ignoring.finish_reason == "length" and ignoring.token_ids == plain.token_ids
    assert ignoring.token_ids[0] == first


def test_ignore_eos_is_per_row(llava_runtime: VLMRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = llava_runtime
    imgs = images()
    plain = run(runtime, imgs, PROMPTS, [SamplingParams(max_tokens=8)] * 3)
    # Every row's own first token is a stop token now: rows stop at once unless they ignore EOS.
    stops = {out.token_ids[0] for out in plain}
    family = runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: stops)
    params = [SamplingParams(max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=8),
              SamplingParams(max_tokens=5, ignore_eos=True)]
    out = run(runtime, imgs, PROMPTS, params)
    assert (out[0].finish_reason, out[0].token_ids) == ("length", plain[0].token_ids)
    assert (out[1].finish_reason, out[1].token_ids) == ("stop", ())
    assert (out[2].finish_reason, out[2].token_ids) == ("length", plain[2].token_ids[:5])
    assert out[0].text == family.decode_text(runtime.ensure_loaded().processor, list(plain[0].token_ids))


def test_ignore_eos_with_sampling_matches_the_same_seed_without_eos(llava_runtime: VLMRuntime,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = llava_runtime
    imgs = images()[:1]
    sampled = SamplingParams(max_tokens=8, temperature=1.5, seed=21, ignore_eos=True)
    (free,) = run(runtime, imgs, PROMPTS[:1], [sampled])
    family = runtime.ensure_loaded().family
    monkeypatch.setattr(family, "stop_token_ids", lambda model, processor: set(free.token_ids))
    (again,) = run(runtime, imgs, PROMPTS[:1], [sampled])
    assert again.token_ids == free.token_ids and again.finish_reason == "length"


# -- cancellation ------------------------------------------------------------------------------------------------
def test_a_cancelled_row_stops_and_the_rest_of_the_batch_goes_on(runtime: VLMRuntime,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "CANCEL_CHECK_S", 0.0)  # ask at every step
    loaded = runtime.ensure_loaded()
    imgs, params = images(), [SamplingParams(max_tokens=12, ignore_eos=True)] * 3
    asked = [0]

    def gone_after_three_checks() -> bool:
        asked[0] += 1
        return asked[0] > 3

    batch = generate_batch(loaded.family, loaded.model, loaded.processor, imgs, PROMPTS, params,
                           cancelled=[None, gone_after_three_checks, lambda: False])
    full = run(runtime, imgs, PROMPTS, params)
    assert batch[1].finish_reason == CANCELLED and len(batch[1].token_ids) == 4
    assert batch[1].token_ids == full[1].token_ids[:4]
    assert asked[0] == 4  # never asked again once cancelled
    assert (batch[0], batch[2]) == (full[0], full[2])


def test_runtime_answers_a_cancelled_request_with_its_error(runtime: VLMRuntime,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "CANCEL_CHECK_S", 0.0)
    request = GenerationRequest(images=(images()[0],), prompt="What is this?",
                                params=SamplingParams(max_tokens=50, ignore_eos=True), is_cancelled=lambda: True)
    kept = GenerationRequest(images=(images()[1],), prompt="hi", params=SamplingParams(max_tokens=3))
    cancelled, answered = runtime.generate([request, kept])
    assert isinstance(cancelled, RequestCancelledError) and "cancelled by its client after 1 tokens" in str(cancelled)
    assert cancelled.triton_code == "CANCELLED"
    assert isinstance(answered, GenerationOutput) and len(answered.token_ids) <= 3
