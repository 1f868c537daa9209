"""The in-process GPU tools' pieces, run on CPU with the tiny llava: triton_vlm.bench.inprocess (HF generate timed
on a batch, closed-loop clients on a running engine) and triton_vlm.bench.gpu_decode_profile's steps, which drive
the engine's runner through its public methods only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from triton_vlm.bench import gpu_decode_profile
from triton_vlm.bench.inprocess import engine_run, hf_generate, probe_inputs
from triton_vlm.engine import EngineConfig, LLMEngine

from .helpers import load_tiny


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any, Any]:
    return load_tiny("llava")


@pytest.fixture
def engine(llava: tuple[Any, Any, Any]) -> Iterator[LLMEngine]:
    family, model, processor = llava
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=512, max_num_seqs=4))
    yield engine
    engine.shutdown()


def test_probe_inputs_are_seeded_336_px_images_with_the_benchmarks_prompt() -> None:
    images, prompts = probe_inputs(3)
    again, _ = probe_inputs(3)
    assert [image.size for image in images] == [(336, 336)] * 3 and len(set(prompts)) == 1
    assert [image.tobytes() for image in images] == [image.tobytes() for image in again]
    assert images[0].tobytes() != images[1].tobytes()


def test_hf_generate_times_one_batch_of_exactly_new_tokens_each(llava: tuple[Any, Any, Any]) -> None:
    family, model, processor = llava
    images, prompts = probe_inputs(2)
    seconds, tokens = hf_generate(model, processor, family, images, prompts, new_tokens=5)
    assert seconds > 0 and [len(row) for row in tokens] == [5, 5]


def test_engine_run_keeps_its_clients_requests_in_flight_until_all_are_done(engine: LLMEngine) -> None:
    images, prompts = probe_inputs(3)
    engine.start()
    run = engine_run(engine, images, prompts, concurrency=2, total=5, new_tokens=4)
    assert (run["concurrency"], run["requests"]) == (2, 5)
    assert sorted(run["outputs"]) == [f"r{i}" for i in range(5)]
    assert all(len(tokens) == 4 for tokens in run["outputs"].values())  # EOS ignored
    assert run["output_tok_s"] == pytest.approx(5 * 4 / run["seconds"])
    assert 0 < run["ttft_p50_s"] < run["seconds"]
    assert engine.cache.free_slots == engine.cache.num_slots


def test_a_profiled_decode_step_runs_eagerly_and_leaves_the_runners_graph_setting_as_it_was(engine: LLMEngine) -> None:
    runner = engine.runner
    runner.use_graphs = True  # as on a GPU: the step below must not replay (or capture) a graph on this CPU
    step = gpu_decode_profile.decode_step(engine, batch=3, context=20, graphs=False)
    keys = engine.cache.keys[0]
    assert not keys[:, :, 19].any()
    step()
    assert runner.use_graphs is True
    # Three rows decoded at position 19 (the 20th): their K written there, no other slot's or position's.
    assert all(keys[slot, :, 19].any() for slot in range(3)) and not keys[3:, :, 19].any()
    assert not keys[:, :, :19].any()
    vocab = engine.decoder.embed_tokens.weight.shape[0]
    assert ((runner.next_tokens[:3] >= 0) & (runner.next_tokens[:3] < vocab)).all()


def test_vision_profiles_build_the_prompt_embeddings_of_new_requests(engine: LLMEngine) -> None:
    seqs = gpu_decode_profile.new_sequences(engine, 2)
    engine.runner.build_prompt_embeds(seqs)
    hidden = engine.decoder.embed_tokens.weight.shape[1]
    for seq in seqs:
        assert seq.prompt_embeds is not None and tuple(seq.prompt_embeds.shape) == (seq.prompt_len, hidden)
