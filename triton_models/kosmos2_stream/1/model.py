"""Triton Python backend entry point for kosmos2 on triton-vlm's engine (decoupled, streaming)."""

from triton_vlm.backend import TritonVLMStreamModel


class TritonPythonModel(TritonVLMStreamModel):
    family = "kosmos2"
