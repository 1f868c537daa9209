"""bench/roofline.py: the bytes and FLOPs of a llava wave, and the floor they put under its time."""

from __future__ import annotations

import pytest

from bench.roofline import Peaks, WaveCost, llava_wave_cost, wave_floor
from triton_vlm.bench.checkpoints import llava_7b_config

LLAVA_LAYER_PARAMS = 4 * 4096 * 4096 + 3 * 4096 * 11008  # MHA q, k, v, o; gate, up, down
LLAVA_LM_HEAD = 4096 * 32064


def test_llava_7b_decode_reads_its_projections_once_a_step_and_its_lm_head_in_float16() -> None:
    fp8 = llava_wave_cost(llava_7b_config(), prompt_tokens=596, output_tokens=128, weight_bytes=1, kv_bytes=1)
    fp16 = llava_wave_cost(llava_7b_config(), prompt_tokens=596, output_tokens=128)
    assert fp8.decode_weight_bytes == 32 * LLAVA_LAYER_PARAMS + 2 * LLAVA_LM_HEAD  # 6.74 GB
    assert fp16.decode_weight_bytes == 2 * 32 * LLAVA_LAYER_PARAMS + 2 * LLAVA_LM_HEAD  # 13.2 GB
    assert (fp8.kv_bytes_per_position, fp16.kv_bytes_per_position) == (2 * 32 * 4096, 4 * 32 * 4096)
    assert fp16.decode_flops_per_row == 2 * (32 * LLAVA_LAYER_PARAMS + LLAVA_LM_HEAD)
    assert fp16.attention_flops_per_position == 4 * 32 * 4096


def test_llava_7b_prefill_and_vision_flops() -> None:
    cost = llava_wave_cost(llava_7b_config(), prompt_tokens=600, output_tokens=128)
    causal_attention = 32 * 2 * 600 ** 2 * 4096
    assert cost.prefill_flops == 2 * 600 * 32 * LLAVA_LAYER_PARAMS + causal_attention + 2 * LLAVA_LM_HEAD
    # CLIP-L/336 up to its second-to-last layer (23 of 24), 577 tokens, then the projector over 576 patches.
    clip_layer = 2 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 4 * 577 ** 2 * 1024
    assert cost.vision_flops == 23 * clip_layer + 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_a_grouped_query_decoder_reads_k_and_v_at_its_kv_width() -> None:
    config = llava_7b_config()
    config.text_config.num_key_value_heads = 8
    cost = llava_wave_cost(config, prompt_tokens=100, output_tokens=8, kv_bytes=1)
    assert cost.kv_bytes_per_position == 2 * 32 * 8 * 128


def cost(**overrides: float) -> WaveCost:
    values = dict(prompt_tokens=10, output_tokens=5, vision_flops=100.0, prefill_flops=1000.0,
                  decode_weight_bytes=400.0, decode_flops_per_row=1.0, kv_bytes_per_position=2.0,
                  attention_flops_per_position=0.0)
    return WaveCost(**{**values, **overrides})


def test_the_serial_floor_adds_vision_and_prefill_at_their_rates_and_bandwidth_bound_decode_steps() -> None:
    floor = wave_floor(cost(), Peaks(bandwidth_b_s=100.0, prefill_flop_s=1000.0, vision_flop_s=50.0), clients=4)
    assert floor.vision_s == pytest.approx(4 * 100 / 50)
    assert floor.prefill_s == pytest.approx(4 * 1000 / 1000)
    # Four decode steps (the fifth token came with the prefill) at contexts 11..14, 4 rows of K/V each.
    assert floor.decode_s == pytest.approx(sum(400 + 4 * 2 * c for c in range(11, 15)) / 100)
    assert floor.serial_s == pytest.approx(8 + 4 + floor.decode_s)
    assert floor.tok_s(5) == pytest.approx(4 * 5 / floor.serial_s)


def test_a_decode_step_with_more_flops_than_its_bytes_allow_is_compute_bound() -> None:
    slow_math = Peaks(bandwidth_b_s=1e12, prefill_flop_s=1.0, vision_flop_s=1.0)
    floor = wave_floor(cost(decode_flops_per_row=10.0), slow_math, clients=2)
    assert floor.decode_s == pytest.approx(4 * 2 * 10.0)


def test_the_overlapped_floor_is_the_longer_of_all_flops_and_all_bytes_and_never_above_the_serial_one() -> None:
    peaks = Peaks(bandwidth_b_s=100.0, prefill_flop_s=1000.0, vision_flop_s=50.0)
    floor = wave_floor(cost(), peaks, clients=4)
    flops_s = 4 * 100 / 50 + (4 * 1000 + 4 * 4 * 1.0) / 1000
    bytes_s = sum(400 + 4 * 2 * c for c in range(11, 15)) / 100
    assert floor.overlapped_s == pytest.approx(max(flops_s, bytes_s))
    assert floor.overlapped_s <= floor.serial_s
    report = floor.as_json(5)
    assert report["serial_tok_s"] == pytest.approx(floor.tok_s(5))
    assert report["overlapped_tok_s"] == pytest.approx(20 / floor.overlapped_s)
