"""triton-vlm: serve vision-language models on NVIDIA Triton Inference Server.

Public entry points:

- :class:`triton_vlm.client.TritonVLMClient` (also importable as ``triton_client.TritonVLMClient``)
- :class:`triton_vlm.runtime.VLMRuntime` for in-process ("direct") inference
- the ``triton-vlm`` command line (``triton_vlm.cli.main``)
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
