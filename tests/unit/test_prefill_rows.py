"""Short text prompt chunks run as decode rows of their slot (``prefill_rows_max``): each row stores its K/V and
attends to the slot up to itself, which must be exactly causal prefill. Tiny models on the CPU (the torch twin of
the slotted decode attention; tests/gpu checks the kernel), against the batched loop's greedy tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.unit import test_engine_llava_next as llava_next_cpu
from tests.unit import test_engine_llava_onevision as llava_onevision_cpu
from tests.unit import test_engine_smolvlm as smolvlm_cpu
from tests.unit.helpers import ParityCase, noise

from triton_vlm.config import ConfigError, EngineConfig
from triton_vlm.engine import kernels
from triton_vlm.sampling import SamplingParams

CASES = {"llava_next": llava_next_cpu.CASE, "llava_onevision": llava_onevision_cpu.CASE, "smolvlm": smolvlm_cpu.CASE,
         "llava": ParityCase("llava", ["What is this?", "a photo of a cat sitting on a red mat. Describe it in "
                                       "detail, with every colour you can see.", "hi", "count 1 2 3 4 5"],
                             [(64, 48), (20, 50), (33, 33), (90, 20)], [12, 7, 15, 10])}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[ParityCase, Any, list[list[int]]]:
    parity = CASES[request.param]
    loaded = parity.load()
    return parity, loaded, parity.reference(loaded)


def rows_engine(parity: ParityCase, loaded: Any, **config: Any) -> Any:
    """An engine that runs rows on the CPU too (where there are no graphs, the runner keeps to prefill)."""
    engine = parity.engine(loaded, **config)
    engine.runner.rows_eagerly = True
    return engine


def test_chunks_after_the_image_run_as_rows_and_keep_the_tokens(case: tuple[ParityCase, Any, list[list[int]]]) -> None:
    """Prompts in chunks of 16: those holding image rows prefill as before, the text ones after them as rows."""
    parity, loaded, reference = case
    engine = rows_engine(parity, loaded, max_num_seqs=2, max_prefill_tokens=16, prefill_rows_max=16)
    assert engine.generate(parity.items()) == reference
    assert engine.stats.row_prefills > 0
    assert engine.cache.free_slots == engine.cache.num_slots


def test_a_later_turn_prefills_its_new_text_as_rows(case: tuple[ParityCase, Any, list[list[int]]]) -> None:
    """The same requests again, one at a time as a chat's turns come: each starts from its cached prefix, and what
    is left (the prompt's last block or so) is short text."""
    parity, loaded, reference = case
    engine = rows_engine(parity, loaded, max_num_seqs=4, prefill_rows_max=128)
    assert engine.generate(parity.items()) == reference
    rows, hits = engine.stats.row_prefills, engine.stats.prefix_hits
    assert [engine.generate([item])[0] for item in parity.items()] == reference
    # Every hit left a short text remainder, and it ran as rows.
    assert engine.stats.prefix_hits - hits >= 2 and engine.stats.row_prefills - rows >= engine.stats.prefix_hits - hits


def test_rows_are_off_unless_asked_for_and_graphed() -> None:
    parity = CASES["llava"]
    loaded = parity.load()
    for engine in (rows_engine(parity, loaded, max_num_seqs=2, max_prefill_tokens=16),
                   parity.engine(loaded, max_num_seqs=2, max_prefill_tokens=16, prefill_rows_max=16)):
        engine.generate(parity.items()[:1])
        assert engine.stats.row_prefills == 0
    with pytest.raises(ConfigError, match="prefill_rows_max"):
        EngineConfig(prefill_rows_max=-1)


def test_slotted_rows_read_the_slots_they_name() -> None:
    """The torch twin with ``slots``: three rows of slot 2 with growing lengths, one of slot 0."""
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(4, 2, 10, 8, generator=generator), torch.randn(4, 2, 10, 8, generator=generator)
    q = torch.randn(4, 4, 8, generator=generator)
    slots, lengths = torch.tensor([2, 2, 2, 0]), torch.tensor([3, 4, 5, 7])
    out = kernels.decode_attention_torch(q, keys, values, lengths, 10, slots=slots)
    for row in range(4):
        alone = kernels.decode_attention_torch(q[row:row + 1], keys[slots[row]][None], values[slots[row]][None],
                                               lengths[row:row + 1], 10)
        torch.testing.assert_close(out[row:row + 1], alone)


def test_a_chunk_with_image_rows_is_not_taken_as_rows() -> None:
    parity = CASES["llava"]
    loaded = parity.load()
    engine = rows_engine(parity, loaded, prefill_rows_max=128)
    request = engine.prepare(noise(20, 20, 0), "hi", SamplingParams(max_tokens=2), lambda _: None)
    from triton_vlm.engine.request import Sequence
    from triton_vlm.engine.scheduler import PrefillChunk

    seq = Sequence(request)
    rows = request.mm_inputs["image_rows"]
    assert not engine.runner.takes_as_rows([PrefillChunk(seq, 0, len(request.prompt_ids))])
    after = max(rows) + 1
    assert engine.runner.takes_as_rows([PrefillChunk(seq, after, len(request.prompt_ids) - after)])


def test_warmup_captures_the_rows_sizes_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs are captured ahead of traffic: the decode buckets, and each rows size a chunk up to
    ``prefill_rows_max`` can take (captures recorded here; the CPU has no graphs)."""
    parity = CASES["llava"]
    runner = parity.engine(parity.load(), max_num_seqs=4, prefill_rows_max=40).runner
    captured: list[tuple[str, int]] = []
    monkeypatch.setattr(runner, "use_graphs", True)
    monkeypatch.setattr(runner, "_capture", lambda batch, context: captured.append(("decode", batch)) or (None, None))
    monkeypatch.setattr(runner, "_capture_rows", lambda size, context: captured.append(("rows", size)) or (None, None))
    runner.warmup()
    assert captured == [("decode", b) for b in runner.buckets] + [("rows", 16), ("rows", 32), ("rows", 64)]
    runner.warmup()
    assert len(captured) == len(runner.buckets) + 3  # once each
