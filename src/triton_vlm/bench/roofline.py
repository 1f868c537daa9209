"""The least time one GPU can take for a closed-loop VLM workload, from its bytes, its FLOPs and measured peaks.

A "wave" is ``clients`` requests that each encode one image, prefill ``prompt_tokens`` positions and decode
``output_tokens`` tokens (the first from the prefill). Its floor has two forms:

- ``serial``: each phase at the device's best rate for what bounds it (vision and prefill at the matmul peak,
  each decode step at the bandwidth peak for the weights and every row's K/V), phases one after another, as
  every engine that runs them as separate kernels does;
- ``overlapped``: all FLOPs and all bytes of the wave at once, whichever takes longer; no kernel mix reaches it.

Nothing else counts: no norms, rotary, sampling, launch gaps or host time. Used by
:mod:`triton_vlm.bench.gpu_roofline`; plain arithmetic so it is tested on CPU (tests/unit/test_bench_roofline.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Peaks:
    """Measured device peaks: bytes/s streamed from memory, and FLOP/s of the matmuls each phase runs."""

    bandwidth_b_s: float
    prefill_flop_s: float  # the language model's matmul dtype (fp8 with fp8 projections)
    vision_flop_s: float  # fp16: the vision tower is never quantized


@dataclass(frozen=True)
class WaveCost:
    """One request's work in a llava-style model (a ViT, a projector, a Llama decoder)."""

    prompt_tokens: int
    output_tokens: int
    vision_flops: float  # one image through the tower and the projector
    prefill_flops: float  # the prompt's positions through the decoder, causal attention, one logits row
    decode_weight_bytes: float  # what every decode step reads once, however many rows it has
    decode_flops_per_row: float  # one decode row, not counting attention
    kv_bytes_per_position: float  # K and V of one position over all layers
    attention_flops_per_position: float  # one decode row's QK and PV over one cached position, all layers


def llava_wave_cost(config: Any, prompt_tokens: int, output_tokens: int, weight_bytes: float = 2.0,
                    kv_bytes: float = 2.0, lm_head_bytes: float = 2.0) -> WaveCost:
    """:class:`WaveCost` of a ``LlavaConfig`` (a CLIP tower up to ``vision_feature_layer``, a two-layer
    projector, a Llama decoder). ``weight_bytes``/``kv_bytes``: bytes an element of the decoder's projections /
    the KV cache (1 for fp8); the vision tower and the projector count at float16 FLOPs only."""
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_tokens = patches + 1  # and the class token
    layer = vision.num_hidden_layers + 1 + config.vision_feature_layer if config.vision_feature_layer < 0 \
        else config.vision_feature_layer
    vd, vf = vision.hidden_size, vision.intermediate_size
    per_vision_layer = 2 * vision_tokens * (4 * vd * vd + 2 * vd * vf) + 4 * vision_tokens ** 2 * vd
    projector = 2 * patches * (vd * text.hidden_size + text.hidden_size * text.hidden_size)
    d, f, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    kv_width = text.num_key_value_heads * head_dim
    layer_params = d * d * 2 + 2 * d * kv_width + 3 * d * f  # q, o; k, v; gate, up, down
    decoder_params = layers * layer_params
    lm_head = d * text.vocab_size
    # Causal attention over a P-position prompt: QK and PV each ~P^2/2 dot products of length d, per layer.
    prefill_attention = layers * 2 * prompt_tokens ** 2 * d
    return WaveCost(
        prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        vision_flops=float(layer * per_vision_layer + projector),
        prefill_flops=float(2 * prompt_tokens * decoder_params + prefill_attention + 2 * lm_head),
        decode_weight_bytes=float(decoder_params * weight_bytes + lm_head * lm_head_bytes),
        decode_flops_per_row=float(2 * (decoder_params + lm_head)),
        kv_bytes_per_position=float(2 * layers * kv_width * kv_bytes),
        attention_flops_per_position=float(4 * layers * d))


@dataclass(frozen=True)
class WaveFloor:
    """Seconds one wave of ``clients`` requests cannot go below, by phase, and the throughput that allows."""

    clients: int
    vision_s: float
    prefill_s: float
    decode_s: float
    overlapped_s: float

    @property
    def serial_s(self) -> float:
        """Vision, prefill and decode one after another."""
        return self.vision_s + self.prefill_s + self.decode_s

    def tok_s(self, output_tokens: int, overlapped: bool = False) -> float:
        """Output tokens a second at the serial (or the overlapped) floor."""
        return self.clients * output_tokens / (self.overlapped_s if overlapped else self.serial_s)

    def as_json(self, output_tokens: int) -> dict[str, Any]:
        """The floor's fields, with the serial time and both throughputs."""
        return {**asdict(self), "serial_s": self.serial_s, "serial_tok_s": self.tok_s(output_tokens),
                "overlapped_tok_s": self.tok_s(output_tokens, overlapped=True)}


def wave_floor(cost: WaveCost, peaks: Peaks, clients: int) -> WaveFloor:
    """The floor of one wave: ``clients`` requests side by side, decoding in lockstep."""
    vision_s = clients * cost.vision_flops / peaks.vision_flop_s
    prefill_s = clients * cost.prefill_flops / peaks.prefill_flop_s
    decode_s = 0.0
    decode_bytes = decode_flops = 0.0
    for step in range(cost.output_tokens - 1):  # the first token came with the prefill
        context = cost.prompt_tokens + step + 1
        step_bytes = cost.decode_weight_bytes + clients * context * cost.kv_bytes_per_position
        step_flops = clients * (cost.decode_flops_per_row + context * cost.attention_flops_per_position)
        decode_s += max(step_bytes / peaks.bandwidth_b_s, step_flops / peaks.prefill_flop_s)
        decode_bytes += step_bytes
        decode_flops += step_flops
    flops_s = (clients * cost.vision_flops / peaks.vision_flop_s
               + (clients * cost.prefill_flops + decode_flops) / peaks.prefill_flop_s)
    # Prefill reads every weight once too; at these batch sizes that is noise beside the decode steps' reads.
    bytes_s = decode_bytes / peaks.bandwidth_b_s
    return WaveFloor(clients=clients, vision_s=vision_s, prefill_s=prefill_s, decode_s=decode_s,
                     overlapped_s=max(flops_s, bytes_s))
