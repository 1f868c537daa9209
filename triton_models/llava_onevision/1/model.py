"""Triton Python backend entry point for the llava_onevision family; the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "llava_onevision"
