"""triton_vlm.bench.roofline: the bytes and FLOPs of a llava wave, and the floor they put under its time; and
triton_vlm.bench.gpu_roofline's report of a run beside that floor."""

from __future__ import annotations

import pytest

from triton_vlm.bench import gpu_roofline
from triton_vlm.bench.checkpoints import llava_7b_config
from triton_vlm.bench.roofline import Peaks, WaveCost, llava_wave_cost, wave_floor

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


def measured_run(gpu: str, device_s: dict[str, float]) -> dict:
    """What gpu_roofline measured in a run of 128 requests (two waves of 64), as it records it."""
    return {"gpu": gpu, "clients": 64, "requests": 128, "output_tokens": 128, "prompt_tokens": 600,
            "quantization": "fp8", "kv_cache_dtype": "fp8", "engine_c64_tok_s": 4000.0, "engine_seconds": 4.1,
            "engine_device_s": device_s, "hf_c64_tok_s": 700.0, "hf_c64_repeated_tok_s": 1400.0}


def test_the_run_floor_is_its_waves_at_each_set_of_peaks_and_the_shares_are_against_it() -> None:
    cost = llava_wave_cost(llava_7b_config(), prompt_tokens=600, output_tokens=128, weight_bytes=1, kv_bytes=1)
    measured = Peaks(bandwidth_b_s=3.0e12, prefill_flop_s=1.3e15, vision_flop_s=7.6e14)
    result = measured_run("NVIDIA H100 80GB HBM3", {"build_prompt_embeds": 0.4, "prefill": 1.9, "decode": 3.2})
    gpu_roofline.add_floors(result, cost, measured)
    assert set(result["floors"]) == {"measured_peaks", "h100_sxm_datasheet"}
    floor = wave_floor(cost, measured, clients=64)
    entry = result["floors"]["measured_peaks"]
    assert entry["run_floor_s"] == pytest.approx({"vision": 2 * floor.vision_s, "prefill": 2 * floor.prefill_s,
                                                  "decode": 2 * floor.decode_s, "serial": 2 * floor.serial_s})
    assert entry["engine_share_of_serial_floor"] == pytest.approx(4000 / floor.tok_s(128))
    assert result["six_x_hf_repeated_tok_s"] == 6 * 1400.0
    assert entry["six_x_hf_repeated_share_of_overlapped_floor"] == pytest.approx(
        8400 / floor.tok_s(128, overlapped=True))
    assert (result["engine_over_hf"], result["engine_over_hf_repeated"]) == pytest.approx((4000 / 700, 4000 / 1400))
    # The datasheet's peaks are higher than any measured: a lower floor.
    assert result["floors"]["h100_sxm_datasheet"]["run_floor_s"]["serial"] < entry["run_floor_s"]["serial"]
    lines = gpu_roofline.table(result).splitlines()
    vision = next(line for line in lines if line.startswith("vision"))
    assert vision.split()[1:] == ["0.400", f"{2 * floor.vision_s:.3f}", f"{2 * floor.vision_s / 0.4:.2f}"]
    assert [line.split()[0] for line in lines[2:5]] == ["vision", "prefill", "decode"]
    assert any(line.startswith("floor at h100_sxm_datasheet") for line in lines)


def test_steps_that_prefill_and_decode_together_are_set_beside_both_floors_and_other_gpus_get_measured_peaks() -> None:
    cost = llava_wave_cost(llava_7b_config(), prompt_tokens=600, output_tokens=128)
    measured = Peaks(bandwidth_b_s=3.0e12, prefill_flop_s=7.0e14, vision_flop_s=7.0e14)
    result = measured_run("NVIDIA H200", {"build_prompt_embeds": 0.3, "prefill": 0.5, "decode": 6.0,
                                          "prefill_and_decode": 1.5})
    gpu_roofline.add_floors(result, cost, measured)
    assert set(result["floors"]) == {"measured_peaks"}
    run_floor = result["floors"]["measured_peaks"]["run_floor_s"]
    mixed = next(line for line in gpu_roofline.table(result).splitlines() if line.startswith("prefill+decode"))
    assert mixed.split()[1:3] == ["8.000", f"{run_floor['prefill'] + run_floor['decode']:.3f}"]
