"""Images seen again (a chat resends its image with every turn): decoded once, by the digest of their file
(``triton_vlm.images.DecodedImages``), and through the processor once in the engine's one-image requests of the
families whose processor only expands a placeholder (``EngineAdapter.reuse_image``: the LLaVA families and Qwen2-VL): a
later request is prepared exactly as it would be from scratch."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from triton_vlm.chat import parse_messages
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.errors import InvalidInputError
from triton_vlm.images import DIGEST_KEY, DecodedImages, file_digest
from triton_vlm.memo import BoundedMemo
from triton_vlm.sampling import SamplingParams

from .helpers import encode, image_bytes, load_tiny, noise

LIMITS = {"max_bytes": 1 << 24, "max_pixels": 1 << 24}


# -- the memo ----------------------------------------------------------------------------------------------------
def test_the_memo_keeps_the_most_recently_used_within_its_bytes() -> None:
    memo: BoundedMemo[str, str] = BoundedMemo(10)
    memo.put("a", "A", 4)
    memo.put("b", "B", 4)
    assert memo.get("a") == "A"  # now the most recent: "b" leaves first
    memo.put("c", "C", 4)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == ("A", None, "C") and memo.size == 8
    memo.put("a", "A2", 2)  # a new value for a key replaces the old one's bytes
    assert memo.get("a") == "A2" and memo.size == 6 and len(memo) == 2
    memo.put("huge", "H", 11)  # larger than the whole memo: not kept, nothing evicted for it
    assert memo.get("huge") is None and len(memo) == 2
    nothing: BoundedMemo[str, str] = BoundedMemo(0)
    nothing.put("a", "A", 1)
    assert nothing.get("a") is None and nothing.size == 0


def test_the_memo_holds_its_bound_under_threads() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(100)

    def work(base: int) -> None:
        for i in range(2000):
            memo.put(base + i % 50, i, 3)
            memo.get(base + (i * 7) % 50)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memo.size == 3 * len(memo) <= 100


# -- decoding --------------------------------------------------------------------------------------------------
def test_the_same_file_is_decoded_once_and_carries_its_digest() -> None:
    images = DecodedImages(1 << 20)
    data = image_bytes(40, 30, seed=1)
    first = images.decode(data, **LIMITS)
    assert images.decode(bytes(data), **LIMITS) is first  # the same bytes, another object
    assert first.info[DIGEST_KEY] == file_digest(data)
    again = images.decode(encode(first, "JPEG"), **LIMITS)  # the same picture in another file: decoded anew
    assert again is not first and again.info[DIGEST_KEY] != first.info[DIGEST_KEY]
    for _ in range(2):  # a broken file is refused every time: nothing is kept of it
        with pytest.raises(InvalidInputError, match="images\\[1\\]"):
            images.decode(data[:100], field="images[1]", **LIMITS)
    with pytest.raises(InvalidInputError, match="over the limit"):  # the limits hold for a kept file too
        images.decode(data, max_bytes=len(data) - 1, max_pixels=1 << 24)


def test_without_room_every_file_is_decoded_again() -> None:
    images = DecodedImages(0)
    data = image_bytes(40, 30, seed=2)
    first, second = images.decode(data, **LIMITS), images.decode(data, **LIMITS)
    assert first is not second and first.info[DIGEST_KEY] == second.info[DIGEST_KEY] == file_digest(data)


def test_a_runtime_decodes_a_chats_image_once(llava_runtime: Any) -> None:
    data = image_bytes(48, 40, seed=3)
    turn = '[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]'
    first = llava_runtime.make_chat_request(turn, [data]).images[0]
    assert llava_runtime.make_request(data, "What is it?").images[0] is first


# -- the engine's processed images ---------------------------------------------------------------------------------
def turns() -> list[Any]:
    """A conversation about one image, turn by turn (each turn's messages)."""
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    second = [*first, {"role": "assistant", "content": "A cat on a mat."},
              {"role": "user", "content": "What color is the mat?"}]
    return [parse_messages(__import__("json").dumps(messages), 1) for messages in (first, second)]


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest) -> tuple[Any, Any, Any]:
    return load_tiny(request.param)


def test_a_later_turn_about_the_same_image_is_prepared_as_from_scratch(tiny: tuple[Any, Any, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    family, model, processor = tiny
    reusing = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024))
    fresh = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024, image_cache_mb=0))
    processed = []
    prepare = reusing.adapter.prepare
    monkeypatch.setattr(reusing.adapter, "prepare", lambda *args: processed.append(args[2]) or prepare(*args))
    decoded = DecodedImages(1 << 24)
    sizes = [(40, 30), (64, 64), (17, 90)]  # anyres: a different number of positions each
    images = [decoded.decode(encode(noise(w, h, seed), "PNG"), **LIMITS) for seed, (w, h) in enumerate(sizes)]
    params = SamplingParams(max_tokens=4)
    for image in images:
        for chat in turns():
            got = reusing.prepare(image, chat, params, lambda out: None)
            expected = fresh.prepare(image, chat, params, lambda out: None)
            assert got.prompt_ids == expected.prompt_ids
            assert set(got.mm_inputs) == set(expected.mm_inputs)
            for key, value in expected.mm_inputs.items():
                same = torch.equal(got.mm_inputs[key], value) if isinstance(value, torch.Tensor) else (
                    got.mm_inputs[key] == value)
                assert same, key
            assert got.prefix_keys == expected.prefix_keys
            assert got.rope_delta == expected.rope_delta  # Qwen2-VL's 3-D positions, from the inputs
            assert (got.prompt_positions is None) == (expected.prompt_positions is None)
            if expected.prompt_positions is not None:
                assert torch.equal(got.prompt_positions, expected.prompt_positions)
    reuses = reusing.adapter.reuses_images
    # The processor ran for each image's first turn only, where the family's requests can be built without it.
    assert len(processed) == (len(images) if reuses else 2 * len(images))
    assert reuses  # every family here: the LLaVA ones and Qwen2-VL


def test_requests_with_several_images_or_none_are_prepared_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    family, model, processor = load_tiny("llava")
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=1024))
    calls = []
    prepare = engine.adapter.prepare
    monkeypatch.setattr(engine.adapter, "prepare", lambda *args: calls.append(len(args[2])) or prepare(*args))
    decoded = DecodedImages(1 << 24)
    one, two = (decoded.decode(image_bytes(40, 30, seed=s), **LIMITS) for s in (5, 6))
    two_images = parse_messages('[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, '
                                '{"type": "text", "text": "Compare."}]}]', 2)
    text_only = parse_messages('[{"role": "user", "content": "Hello."}]', 0)
    for _ in range(2):
        engine.prepare([one, two], two_images, SamplingParams(max_tokens=2), lambda out: None)
        engine.prepare([], text_only, SamplingParams(max_tokens=2), lambda out: None)
    assert calls == [2, 0, 2, 0]
    plain = noise(40, 30, seed=7)  # an image that came from no file (the Python API): no digest, no reuse
    for _ in range(2):
        engine.prepare(plain, "What is it?", SamplingParams(max_tokens=2), lambda out: None)
    assert calls[-2:] == [1, 1]
