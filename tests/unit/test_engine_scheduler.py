"""triton_vlm.engine.scheduler and kv_cache: admission, prefill budgets, decode lists, slot allocation."""

from __future__ import annotations

import pytest
import torch

from triton_vlm.config import EngineConfig
from triton_vlm.engine.kv_cache import SlotKVCache
from triton_vlm.engine.request import EngineRequest, Sequence, SequenceStatus
from triton_vlm.engine.scheduler import PrefillChunk, Scheduler
from triton_vlm.errors import InvalidInputError
from triton_vlm.sampling import SamplingParams

CPU = torch.device("cpu")


def cache(slots: int, max_len: int = 64) -> SlotKVCache:
    return SlotKVCache(num_layers=1, num_slots=slots, num_kv_heads=1, head_dim=2, max_len=max_len,
                       dtype=torch.float32, device=CPU)


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(EngineRequest(request_id=name, prompt_ids=list(range(prompt_len)), params=SamplingParams(),
                                  on_output=lambda out: None))


def scheduler(slots: int, max_num_seqs: int = 64, max_prefill_tokens: int = 4096) -> Scheduler:
    config = EngineConfig(max_model_len=64, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens)
    return Scheduler(config, cache(slots))


def apply(plan_prefill: list[PrefillChunk]) -> None:
    """What the engine does after a step: advance the prefilled count, switch finished prompts to decoding."""
    for chunk in plan_prefill:
        chunk.seq.num_prefilled += chunk.length
        if chunk.completes_prompt:
            chunk.seq.status = SequenceStatus.DECODING


def names(seqs: list[Sequence]) -> list[str]:
    return [s.request.request_id for s in seqs]


# -- admission ----------------------------------------------------------------------------------------------------
def test_admission_is_limited_by_free_slots() -> None:
    sched = scheduler(slots=2)
    for name in "abc":
        sched.add(seq(name, 5))
    plan = sched.schedule()
    assert names(plan.admitted) == ["a", "b"] and names(sched.running) == ["a", "b"]
    assert names(list(sched.waiting)) == ["c"] and sched.cache.free_slots == 0
    assert [s.slot for s in plan.admitted] == [0, 1]
    assert all(s.status is SequenceStatus.PREFILLING for s in plan.admitted)
    assert sched.waiting[0].status is SequenceStatus.WAITING and sched.waiting[0].slot == -1


def test_admission_is_limited_by_max_num_seqs() -> None:
    sched = scheduler(slots=4, max_num_seqs=2)
    for name in "abc":
        sched.add(seq(name, 5))
    assert names(sched.schedule().admitted) == ["a", "b"]
    assert sched.cache.free_slots == 2  # slots left, but max_num_seqs says no
    assert sched.schedule().admitted == []


def test_finishing_frees_a_slot_for_the_next_waiting_request() -> None:
    sched = scheduler(slots=2)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    apply(sched.schedule().prefill)
    sched.finish(a, "stop")
    assert (a.status, a.finish_reason, a.slot) == (SequenceStatus.FINISHED, "stop", -1)
    assert sched.cache.free_slots == 1
    plan = sched.schedule()
    assert names(plan.admitted) == ["c"] and c.slot == 0  # a's slot, the lowest free one
    assert names(plan.decode) == ["b"] and [ch.seq for ch in plan.prefill] == [c]


def test_finish_a_waiting_sequence_and_find() -> None:
    sched = scheduler(slots=1)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.find("a") == [a] and sched.find("b") == [b] and sched.find("zzz") == []
    sched.finish(b, "abort")
    assert list(sched.waiting) == [] and sched.find("b") == [] and sched.cache.free_slots == 0
    sched.finish(a, "abort")
    assert not sched.has_work() and sched.cache.free_slots == 1


def test_empty_scheduler_plans_nothing() -> None:
    sched = scheduler(slots=2)
    plan = sched.schedule()
    assert plan.empty and not sched.has_work()


# -- prefill budget and decode ---------------------------------------------------------------------------------------
def test_prefill_budget_is_split_across_sequences_oldest_first() -> None:
    sched = scheduler(slots=4, max_prefill_tokens=16)
    a, b, c = seq("a", 10), seq("b", 10), seq("c", 30)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert names(plan.admitted) == ["a", "b", "c"]  # admitted together, prefilled as the budget allows
    assert [(ch.seq, ch.start, ch.length) for ch in plan.prefill] == [(a, 0, 10), (b, 0, 6)]
    assert [ch.completes_prompt for ch in plan.prefill] == [True, False]
    assert plan.decode == []
    apply(plan.prefill)

    plan = sched.schedule()
    assert plan.admitted == [] and names(plan.decode) == ["a"]
    assert [(ch.seq, ch.start, ch.length) for ch in plan.prefill] == [(b, 6, 4), (c, 0, 12)]
    apply(plan.prefill)

    plan = sched.schedule()
    assert names(plan.decode) == ["a", "b"]
    assert [(ch.seq, ch.start, ch.length, ch.completes_prompt) for ch in plan.prefill] == [(c, 12, 16, False)]
    apply(plan.prefill)
    plan = sched.schedule()
    assert [(ch.start, ch.length, ch.completes_prompt) for ch in plan.prefill] == [(12 + 16, 2, True)]
    apply(plan.prefill)
    plan = sched.schedule()
    assert plan.prefill == [] and names(plan.decode) == ["a", "b", "c"]


def test_budget_spent_exactly_leaves_later_prompts_for_the_next_step() -> None:
    sched = scheduler(slots=3, max_prefill_tokens=16)
    a, b = seq("a", 16), seq("b", 4)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(ch.seq, ch.length) for ch in plan.prefill] == [(a, 16)]  # nothing left for b this step
    apply(plan.prefill)
    plan = sched.schedule()
    assert [(ch.seq, ch.start, ch.length) for ch in plan.prefill] == [(b, 0, 4)] and plan.decode == [a]


def test_decode_list_is_every_decoding_sequence_in_running_order() -> None:
    sched = scheduler(slots=4)
    seqs = [seq(n, 3) for n in "abcd"]
    for s in seqs:
        sched.add(s)
    apply(sched.schedule().prefill)
    assert names(sched.schedule().decode) == ["a", "b", "c", "d"]
    sched.finish(seqs[1], "length")
    assert names(sched.schedule().decode) == ["a", "c", "d"]


def test_prefill_chunk_completes_prompt() -> None:
    s = seq("a", 10)
    assert PrefillChunk(s, 0, 10).completes_prompt
    assert PrefillChunk(s, 4, 6).completes_prompt
    assert not PrefillChunk(s, 0, 9).completes_prompt


# -- SlotKVCache ----------------------------------------------------------------------------------------------------
def test_slots_are_allocated_lowest_first_and_released() -> None:
    kv = cache(4)
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2] and kv.free_slots == 1
    kv.release(1)
    kv.release(0)
    assert kv.free_slots == 3
    assert kv.allocate() == 0 and kv.allocate() == 1 and kv.allocate() == 3
    assert kv.free_slots == 0


def test_cache_layout_has_a_scratch_column() -> None:
    kv = SlotKVCache(num_layers=3, num_slots=2, num_kv_heads=4, head_dim=8, max_len=32, dtype=torch.float16,
                     device=CPU)
    assert len(kv.keys) == len(kv.values) == 3
    assert kv.keys[0].shape == (2, 4, 33, 8) and kv.keys[0].dtype == torch.float16
    assert kv.scratch_position == 32 == kv.max_len
    assert SlotKVCache.bytes_per_slot(3, 4, 8, 32, torch.float16) == 2 * 3 * 4 * 33 * 8 * 2


def test_sized_for_on_cpu_gives_max_slots() -> None:
    kv = SlotKVCache.sized_for(2, 2, 16, 128, 5, torch.float32, CPU, 0.5)
    assert kv.num_slots == 5 and kv.free_slots == 5 and kv.max_len == 128


# -- EngineConfig -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_model_len": 15}, "max_model_len must be >= 16"),
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
    ({"max_prefill_tokens": 8}, "max_prefill_tokens must be >= 16"),
    ({"kv_cache_memory_fraction": 0.99}, "kv_cache_memory_fraction must be in [0.05, 0.98]"),
    ({"kv_cache_memory_fraction": 0.01}, "kv_cache_memory_fraction"),
    ({"graph_len_step": 8}, "graph_len_step must be >= 16"),
])
def test_engine_config_validation(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        EngineConfig(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
