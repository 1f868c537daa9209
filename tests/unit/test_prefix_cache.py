"""The engine's prefix cache: block keys that name a prompt's prefix and its images, slot placement (take over an
idle slot, copy from a busy one, evict the least recently used), and on the tiny models (CPU) a follow-up chat turn
that reuses the first turn's K/V and skips the vision tower, with the same tokens as an engine without the cache;
under chunked prefill, aborts, failed steps and eviction too."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from triton_vlm.chat import Chat, ImagePart, Message
from triton_vlm.config import ConfigError, EngineConfig
from triton_vlm.engine import LLMEngine, RequestOutput
from triton_vlm.engine.prefix_cache import Placement, PrefixCache, PrefixKeys, prompt_keys
from triton_vlm.engine.request import SequenceStatus
from triton_vlm.sampling import SamplingParams

from .helpers import load_tiny, noise

BLOCK = 4
A, B, C = noise(8, 8, 1), noise(8, 8, 2), noise(8, 8, 3)


def keys(tokens: list[int], rows: list[int] = [], images: list[Image.Image] = []) -> PrefixKeys:  # noqa: B006
    return prompt_keys(tokens, rows, images, BLOCK)


# -- keys -------------------------------------------------------------------------------------------------------
def test_a_key_names_the_prefix_up_to_its_block() -> None:
    one, two = keys(list(range(16))), keys([*range(9), 99, *range(10, 16)])
    assert len(one.keys) == 4  # whole blocks only
    assert one.keys[:2] == two.keys[:2]
    assert one.keys[2] != two.keys[2] and one.keys[3] != two.keys[3]  # block 3 is equal, but what precedes it is not
    assert len(set(keys([7] * 16).keys)) == 4  # the same tokens at another position is another key
    assert keys(list(range(18))).keys == one.keys  # a partial last block has no key


def test_image_rows_mark_their_blocks_with_the_image() -> None:
    tokens = [1, 2, 3, 5, 5, 5, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # rows 3..7 take the image's features
    rows = list(range(3, 8))
    with_a, with_b = keys(tokens, rows, [A]), keys(tokens, rows, [B])
    assert with_a.keys[0] != with_b.keys[0] and with_a.keys[3] != with_b.keys[3]
    assert keys(tokens, rows, [A.copy()]).keys == with_a.keys  # content, not identity
    assert keys(tokens, rows, [A]).keys != keys(tokens).keys


def test_each_image_marks_only_the_blocks_of_its_own_rows() -> None:
    tokens = [1] * 4 + [5] * 4 + [2] * 4 + [5] * 4 + [3] * 4
    rows = [*range(4, 8), *range(12, 16)]
    ab, ac = keys(tokens, rows, [A, B]), keys(tokens, rows, [A, C])
    assert ab.keys[:3] == ac.keys[:3]  # the shared first image and the text before the second
    assert ab.keys[3] != ac.keys[3]


def test_rows_that_are_not_one_run_per_image_are_marked_with_every_image() -> None:
    tokens = [1] * 4 + [5] * 4 + [2] * 4 + [5] * 4 + [3] * 4
    rows = [*range(4, 8), *range(12, 16)]  # two runs, three images: which run is which cannot be told
    abc, abd = keys(tokens, rows, [A, B, C]), keys(tokens, rows, [A, B, noise(8, 8, 4)])
    assert abc.keys[0] == abd.keys[0]  # text only
    assert abc.keys[1] != abd.keys[1]  # the first run already names every image: fewer hits, never a wrong one


def test_keys_extend_over_generated_tokens() -> None:
    prompt = keys(list(range(10)))
    assert prompt.over([*range(10), 50, 51, 52, 53, 54, 55]) == keys([*range(10), 50, 51, 52, 53, 54, 55]).keys


# -- placement --------------------------------------------------------------------------------------------------
def test_a_request_takes_over_the_idle_slot_that_holds_its_prefix() -> None:
    cache = PrefixCache(4, BLOCK)
    first = keys(list(range(20)))
    cache.place(None, [0, 1, 2, 3], 8)  # slot 0, busy and holding nothing
    assert cache.place(first, [1, 2, 3], 20) == Placement(1)
    cache.extend(1, first.keys)
    cache.release(1)
    # At least one position is left to prefill: 19 positions, so four whole blocks.
    assert cache.place(first, [1, 2, 3], 20) == Placement(1, 16)
    assert cache.place(keys(list(range(30))), [2, 3], 30) == Placement(2, 16, ((1, 2, 16),))  # busy: copied


def test_a_prefix_held_by_a_busy_slot_is_copied_into_the_lowest_free_one() -> None:
    cache = PrefixCache(3, BLOCK)
    prompt = keys(list(range(12)))
    cache.place(prompt, [0, 1, 2], 12)
    cache.extend(0, prompt.keys[:2])  # two blocks prefilled so far
    assert cache.place(prompt, [1, 2], 12) == Placement(1, 8, ((0, 1, 8),))


def test_one_client_after_another_runs_in_the_lowest_slot_and_earlier_prefixes_move_up() -> None:
    # A decode step is as wide as the highest running slot: one request at a time must stay in slot 0.
    cache = PrefixCache(4, BLOCK)
    prompts = [keys([n] * 8) for n in range(4)]
    everything = [0, 1, 2, 3]

    def run(prompt: PrefixKeys) -> Placement:
        placed = cache.place(prompt, everything, 8)
        cache.extend(placed.slot, prompt.keys)
        cache.release(placed.slot)
        return placed

    assert run(prompts[0]) == Placement(0)
    assert run(prompts[1]) == Placement(0, 0, ((0, 3, 8),))  # prompt 0 moves to the highest empty slot
    assert run(prompts[2]) == Placement(0, 0, ((0, 2, 8),))
    # Prompt 0 again: prompt 2 makes way (to slot 1, the last empty one), then prompt 0's first block comes back
    # from slot 3 (at least one position is left to prefill: 7 positions, one whole block).
    assert run(prompts[0]) == Placement(0, 4, ((0, 1, 8), (3, 0, 4)))
    # No empty slot left: prompt 0 (slot 0) moves over the least recently used idle slot, its own old copy in 3.
    assert run(prompts[3]) == Placement(0, 0, ((0, 3, 8),))
    # Prompt 1 again, every slot holding a prefix: it runs where it is (slot 2), and nothing is pushed out.
    assert run(prompts[1]) == Placement(2, 4)
    assert [cache.place(p, [0, 1, 3], 8).cached for p in (prompts[3], prompts[2], prompts[0])] == [4, 4, 4]


def test_blocks_that_are_the_least_recently_used_are_dropped_rather_than_moved() -> None:
    cache = PrefixCache(2, BLOCK)
    a, b = keys([1] * 8), keys([2] * 8)
    cache.place(a, [0, 1], 8)
    cache.place(b, [1], 8)
    cache.extend(0, a.keys)
    cache.extend(1, b.keys)
    cache.release(0)
    cache.release(1)
    assert cache.place(keys([3] * 8), [0, 1], 8) == Placement(0)  # a was idle longest: gone, no copy
    assert cache.place(b, [1], 8) == Placement(1, 4)  # b stayed where it was
    cache.release(0)
    assert cache.place(a, [0], 8) == Placement(0)


def holding(prompt: PrefixKeys) -> PrefixCache:
    """Two slots, slot 0 holding all of ``prompt``'s blocks (placed, prefilled, its request still running)."""
    cache = PrefixCache(2, BLOCK)
    cache.place(prompt, [0, 1], 12)
    cache.extend(0, prompt.keys)
    return cache


def test_a_prefix_shorter_than_the_bidirectional_one_counts_as_none() -> None:
    prompt = keys(list(range(12)))
    cache = holding(prompt)
    cache.release(0)
    assert cache.place(prompt, [0, 1], 12, min_cached=9).cached == 0
    cache.release(0)
    assert cache.place(prompt, [0, 1], 12, min_cached=8).cached == 8


def test_forget_drops_a_slots_blocks() -> None:
    prompt = keys(list(range(12)))
    cache = holding(prompt)
    cache.forget(0)
    assert cache.place(prompt, [0, 1], 12).cached == 0


def test_block_size_is_checked() -> None:
    with pytest.raises(ConfigError, match="prefix_block_size"):
        EngineConfig(prefix_block_size=0)


# -- the engine (tiny models, CPU) ------------------------------------------------------------------------------
QUESTION = "Describe this picture in detail, please, with all its colours and shapes and whatever else is there."
FOLLOW_UP = "And what is in the background?"


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any, Any]:
    return load_tiny("llava")


def engine(loaded: tuple[Any, Any, Any], **config: Any) -> LLMEngine:
    family, model, processor = loaded
    return LLMEngine(family, model, processor, EngineConfig(**{"max_model_len": 512, **config}))


def count_images(engine: LLMEngine) -> list[int]:
    """Wrap the engine's vision tower: the returned list grows by the rows of pixels of each call."""
    seen: list[int] = []
    encode = engine.runner.encode_images

    def counting(pixels: Any) -> Any:
        seen.append(pixels.shape[0])
        return encode(pixels)

    engine.runner.encode_images = counting
    return seen


def follow_up(loaded: tuple[Any, Any, Any], answer: list[int]) -> Chat:
    family, _model, processor = loaded
    text = family.decode_text(processor, answer)
    return Chat((Message("user", (ImagePart(0), QUESTION)), Message("assistant", (text,)),
                 Message("user", (FOLLOW_UP,))))


def two_turns(loaded: tuple[Any, Any, Any], image: Image.Image, **config: Any) -> tuple[LLMEngine, list[list[int]]]:
    chat = engine(loaded, **config)
    params = SamplingParams(max_tokens=12)
    first = chat.generate([(image, Chat.single(QUESTION), params)])[0]
    second = chat.generate([(image, follow_up(loaded, first), params)])[0]
    return chat, [first, second]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "smolvlm", "kosmos2", "moondream2"])
def test_a_follow_up_turn_reuses_the_first_turns_prefix_and_skips_vision(family: str) -> None:
    loaded = load_tiny(family)
    image = noise(64, 48, 5)
    plain, expected = two_turns(loaded, image, prefix_caching=False)
    cached = engine(loaded)
    images = count_images(cached)
    params = SamplingParams(max_tokens=12)
    first = cached.generate([(image, Chat.single(QUESTION), params)])[0]
    encoded = len(images)
    turn = cached.prepare(image, follow_up(loaded, first), params, lambda out: None)
    rows = turn.mm_inputs["image_rows"]
    second = cached.generate([(image, follow_up(loaded, first), params)])[0]
    assert [first, second] == expected  # the same tokens as prefilling the whole conversation
    stats = cached.stats
    assert (stats.prefix_hits, stats.prefix_misses) == (1, 1)
    # All of the first turn that the second repeats (its prompt, then its answer but the last token), in blocks.
    held = [*cached.prepare(image, Chat.single(QUESTION), params, lambda out: None).prompt_ids, *first[:-1]]
    shared = next((i for i, (a, b) in enumerate(zip(held, turn.prompt_ids, strict=False)) if a != b), len(held))
    assert stats.prefix_cached_tokens == min(shared, len(turn.prompt_ids) - 1) // 16 * 16 > 0
    if stats.prefix_cached_tokens > max(rows):
        assert len(images) == encoded  # the second turn ran no vision: its image is all in the cached prefix
    else:  # kosmos2: its format repeats the image, then parts within the block after it
        assert family == "kosmos2" and len(images) == encoded + 1
    assert plain.stats.prefix_hits == plain.stats.prefix_misses == 0


def test_a_changed_image_is_a_miss_where_its_rows_begin(llava: tuple[Any, Any, Any]) -> None:
    cached = engine(llava)
    params = SamplingParams(max_tokens=4)
    cached.generate([(A, QUESTION, params)])
    request = cached.prepare(B, QUESTION, params, lambda out: None)
    cached.generate([(B, QUESTION, params)])
    assert cached.stats.prefix_cached_tokens == min(request.mm_inputs["image_rows"]) // 16 * 16  # 0 for llava
    assert cached.generate([(B, QUESTION, params)]) == engine(llava, prefix_caching=False).generate(
        [(B, QUESTION, params)])


class Steps:
    """Drives an engine without its thread, collecting outputs by request id."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.finals: dict[str, RequestOutput] = {}
        self.copies: list[tuple[int, int, int]] = []
        schedule = engine.scheduler.schedule

        def recording() -> Any:
            plan = schedule()
            self.copies.extend(plan.copies)
            return plan

        engine.scheduler.schedule = recording  # type: ignore[method-assign]

    def submit(self, image: Image.Image, prompt: Any, max_tokens: int) -> str:
        request = self.engine.prepare(image, prompt, SamplingParams(max_tokens=max_tokens), self._collect)
        self.tokens[request.request_id] = []
        self.engine.submit(request)
        self.engine._drain(block=False)
        return request.request_id

    def _collect(self, out: RequestOutput) -> None:
        self.tokens[out.request_id].extend(out.new_token_ids)
        if out.finished:
            self.finals[out.request_id] = out

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.engine._drain(block=False)
            self.engine.step()

    def run(self) -> None:
        while self.engine.has_work():
            self.step()


def test_a_request_copies_the_prefix_a_running_one_has_prefilled(llava: tuple[Any, Any, Any]) -> None:
    expected = engine(llava, prefix_caching=False).generate([(A, QUESTION, SamplingParams(max_tokens=8))] * 2)
    steps = Steps(engine(llava, max_prefill_tokens=16))
    first = steps.submit(A, QUESTION, 8)
    steps.step(3)  # three chunks of 16 positions in its slot, the prompt not done
    [seq] = steps.engine.scheduler.find(first)
    assert seq.status is SequenceStatus.PREFILLING and seq.num_prefilled == 48
    second = steps.submit(A, QUESTION, 8)
    steps.run()
    assert steps.copies == [(0, 1, 48)]
    assert steps.finals[second].cached_tokens == 48 and steps.finals[first].cached_tokens == 0
    assert [steps.tokens[first], steps.tokens[second]] == expected


def test_an_aborted_prefill_leaves_what_it_wrote(llava: tuple[Any, Any, Any]) -> None:
    expected = engine(llava, prefix_caching=False).generate([(A, QUESTION, SamplingParams(max_tokens=8))])
    steps = Steps(engine(llava, max_prefill_tokens=16))
    aborted = steps.submit(A, QUESTION, 8)
    steps.step(2)
    steps.engine.abort(aborted)
    steps.step()
    assert steps.finals[aborted].finish_reason == "abort"
    again = steps.submit(A, QUESTION, 8)
    steps.run()
    assert steps.finals[again].cached_tokens == 32 and steps.copies == []  # its idle slot, taken over
    assert [steps.tokens[again]] == expected


def test_a_failed_step_leaves_nothing_cached(llava: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cached = engine(llava, max_prefill_tokens=16)
    steps = Steps(cached)
    prefill = cached.runner.prefill
    calls = []

    def failing(chunks: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return prefill(chunks)

    monkeypatch.setattr(cached.runner, "prefill", failing)
    failed = steps.submit(A, QUESTION, 8)
    steps.run()
    assert steps.finals[failed].finish_reason == "error"
    again = steps.submit(A, QUESTION, 8)
    steps.run()
    assert steps.finals[again].cached_tokens == 0
    assert steps.tokens[again] == engine(llava, prefix_caching=False).generate(
        [(A, QUESTION, SamplingParams(max_tokens=8))])[0]


def test_with_few_slots_the_least_recently_used_prefix_is_evicted(llava: tuple[Any, Any, Any]) -> None:
    pictures = [noise(40, 30, seed) for seed in range(4)]
    items = [(image, QUESTION, SamplingParams(max_tokens=6)) for image in pictures]
    expected = engine(llava, prefix_caching=False).generate(items)
    cached = engine(llava, max_num_seqs=2)
    answers = [cached.generate([item])[0] for item in items]  # slots 0, 1, then 0 and 1 again
    assert (cached.stats.prefix_hits, cached.stats.prefix_misses) == (0, 4)
    assert cached.generate([items[0]])[0] == expected[0]  # evicted: a miss, and the right answer
    assert cached.generate([items[3]])[0] == expected[3]  # still held: a hit
    assert answers == expected
    assert (cached.stats.prefix_hits, cached.stats.prefix_misses) == (1, 5)
    assert cached.cache.free_slots == 2


# -- n choices: one prefill --------------------------------------------------------------------------------------
def test_n_greedy_choices_share_one_prefill_and_one_vision_pass(llava: tuple[Any, Any, Any]) -> None:
    single = engine(llava).generate([(A, QUESTION, SamplingParams(max_tokens=8))])
    three = engine(llava)
    images = count_images(three)
    prompt_len = len(three.prepare(A, QUESTION, SamplingParams(), lambda out: None).prompt_ids)
    assert three.generate([(A, QUESTION, SamplingParams(max_tokens=8, n=3))]) == single * 3
    assert len(images) == 1
    # The first choice prefilled the prompt; the others only what lies past its last whole block.
    cached = (prompt_len - 1) // 16 * 16
    assert three.stats.prefix_cached_tokens == 2 * cached
    assert three.stats.prefill_tokens == prompt_len + 2 * (prompt_len - cached)
    assert three.cache.free_slots == three.cache.num_slots


def test_seeded_choices_each_draw_with_their_own_seed(llava: tuple[Any, Any, Any]) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3)
    together = engine(llava).generate([(A, QUESTION, params)])
    apart = engine(llava, prefix_caching=False).generate([(A, QUESTION, params.choice(i)) for i in range(3)])
    assert together == apart
    assert len({tuple(tokens) for tokens in together}) == 3


def test_n_choices_stream_with_their_index_and_abort_together(llava: tuple[Any, Any, Any]) -> None:
    steps = Steps(engine(llava))
    finals: list[RequestOutput] = []
    request = steps.engine.prepare(A, QUESTION, SamplingParams(max_tokens=50, n=4, ignore_eos=True),
                                   lambda out: finals.append(out) if out.finished else None)
    steps.engine.submit(request)
    steps.step(4)
    steps.engine.abort(request.request_id)
    steps.step()
    assert sorted(out.index for out in finals) == [0, 1, 2, 3]
    assert {out.finish_reason for out in finals} == {"abort"}
    assert steps.engine.cache.free_slots == steps.engine.cache.num_slots


def test_one_choice_aborts_alone_and_the_others_go_on(llava: tuple[Any, Any, Any]) -> None:
    """``abort(request_id, index)`` ends that choice only (a stop string in one choice's text): its slot is free at
    once, the other choices run to their end with the tokens they would have had anyway."""
    params = SamplingParams(max_tokens=12, n=3, ignore_eos=True, temperature=1.0, seed=3)
    expected = engine(llava).generate([(A, QUESTION, params)])
    steps = Steps(engine(llava))
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finals: dict[int, RequestOutput] = {}

    def collect(out: RequestOutput) -> None:
        tokens[out.index].extend(out.new_token_ids)
        if out.finished:
            finals[out.index] = out

    request = steps.engine.prepare(A, QUESTION, params, collect)
    steps.engine.submit(request)
    steps.step(5)
    assert not finals and len(steps.engine.scheduler.find(request.request_id)) == 3
    steps.engine.abort(request.request_id, index=1)
    steps.step()
    assert list(finals) == [1] and finals[1].finish_reason == "abort"
    assert [seq.request.index for seq in steps.engine.scheduler.find(request.request_id)] == [0, 2]
    assert steps.engine.cache.free_slots == steps.engine.cache.num_slots - 2
    steps.engine.abort(request.request_id, index=1)  # already ended: nothing happens
    steps.run()
    assert {i: out.finish_reason for i, out in sorted(finals.items())} == {0: "length", 1: "abort", 2: "length"}
    assert [tokens[0], tokens[2]] == [expected[0], expected[2]]
    assert tokens[1] == expected[1][:len(tokens[1])] and 0 < len(tokens[1]) < 12


# -- under load: random arrivals, aborts and few slots ------------------------------------------------------------
CHAT_TURNS = [Chat.single(QUESTION), Chat.single(QUESTION + " Twice."), Chat.single("Short.")]


@pytest.fixture(scope="module")
def answers(llava: tuple[Any, Any, Any]) -> dict[tuple[int, int], list[int]]:
    """What an engine without the cache answers each (image, prompt) pair, 6 tokens."""
    plain = engine(llava, prefix_caching=False)
    pairs = [(i, j) for i in range(2) for j in range(len(CHAT_TURNS))]
    tokens = plain.generate([((A, B)[i], CHAT_TURNS[j], SamplingParams(max_tokens=6)) for i, j in pairs])
    return dict(zip(pairs, tokens, strict=True))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(0, 1), st.integers(0, len(CHAT_TURNS) - 1), st.integers(0, 3),
                               st.booleans()), min_size=3, max_size=8),
       slots=st.integers(1, 3), budget=st.sampled_from([16, 32, 4096]))
def test_random_arrivals_and_aborts_never_change_an_answer(llava: tuple[Any, Any, Any],
                                                            answers: dict[tuple[int, int], list[int]],
                                                            plan: list[tuple[int, int, int, bool]], slots: int,
                                                            budget: int) -> None:
    """Requests (one of two images, one of three prompts that share leading text) arrive a few steps apart, some are
    aborted a step later, on an engine with 1 to 3 slots: every request that finishes has the uncached answer, and
    every slot is free at the end."""
    steps = Steps(engine(llava, max_num_seqs=slots, max_prefill_tokens=budget))
    aborted: set[str] = set()
    for image, prompt, wait, abort in plan:
        request = steps.submit((A, B)[image], CHAT_TURNS[prompt], 6)
        steps.step(wait)
        if abort:
            steps.engine.abort(request)
            aborted.add(request)
            steps.step()
    steps.run()
    for (image, prompt, _wait, _abort), request in zip(plan, steps.tokens, strict=True):
        final = steps.finals[request]
        if final.finish_reason != "abort":
            assert steps.tokens[request] == answers[image, prompt]
        else:
            assert request in aborted
    assert steps.engine.cache.free_slots == steps.engine.cache.num_slots
