"""Triton Python backend entry point for the moondream2 family; the logic lives in triton_vlm.backend."""

from triton_vlm.backend import TritonVLMModel


class TritonPythonModel(TritonVLMModel):
    family = "moondream2"
