"""Triton Python-backend glue. Importable only inside Triton's stub (it needs ``triton_python_backend_utils``)."""

from triton_vlm.backend.python_model import TritonVLMModel

__all__ = ["TritonVLMModel"]
