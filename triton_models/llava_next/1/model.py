"""Triton Python backend entry point for the llava_next family; the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "llava_next"
