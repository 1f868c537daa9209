"""Triton Python backend entry point for moondream2 on triton-vlm's engine (decoupled, streaming)."""

from triton_vlm.backend import TritonVLMStreamModel


class TritonPythonModel(TritonVLMStreamModel):
    family = "moondream2"
