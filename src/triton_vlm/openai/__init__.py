"""An OpenAI-compatible HTTP front for triton-vlm: ``/v1/models`` and ``/v1/chat/completions`` with images.

It runs as its own process (``triton-vlm openai``, or started by ``triton-vlm serve --openai-port N``) and
forwards every request to Triton over gRPC: ``<model>`` for whole answers, ``<model>_stream`` for token
streaming where that companion exists. See docs/openai.md.

Importing this package is cheap (no FastAPI): the launcher only needs :class:`OpenAIOptions`.
"""

from triton_vlm.openai.config import OpenAIOptions, load_api_keys

__all__ = ["OpenAIOptions", "load_api_keys"]
