"""Triton Python backend entry point for the qwen2_vl family (Qwen2-VL, Qwen2.5-VL); the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "qwen2_vl"
