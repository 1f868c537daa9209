"""Qwen2-VL and Qwen2.5-VL: :mod:`.family` (prompt, loading, the batched loop's 3-D positions), :mod:`.checkpoint`
(random-weight checkpoints of both, tiny or full size), :mod:`.processor` (the processor where torchvision is
missing) and :mod:`.engine_adapter` (the engine: the HF vision tower, the engine's Llama decoder with q/k/v biases
and multimodal RoPE)."""

from triton_vlm.models.qwen2_vl.family import Qwen2VLFamily

__all__ = ["Qwen2VLFamily"]
