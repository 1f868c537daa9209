"""Triton Python backend entry point for llava on triton-vlm's engine (decoupled, streaming)."""

from triton_vlm.backend import TritonVLMStreamModel


class TritonPythonModel(TritonVLMStreamModel):
    family = "llava"
